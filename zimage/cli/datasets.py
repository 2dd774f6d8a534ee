"""`zimage datasets`: the Datasets page, headless.

zimage datasets                          list datasets (images, captioned, type, trigger word)
zimage datasets create NAME [--type T] [--trigger W] [--resolution R] [--description D] [--prefix P] [--suffix S]
zimage datasets add NAME PATH...         add image files, folders and zips (each file checked)
zimage datasets check NAME               the validation report; exit 1 when a file has an error
zimage datasets stats NAME               resolutions, buckets, caption lengths
"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("datasets", help="list, create, fill and check datasets")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION")
    c = dsub.add_parser("create", help="create an empty dataset")
    c.add_argument("name")
    c.add_argument("--type", default="character", choices=("character", "style", "concept"))
    c.add_argument("--trigger", default="", help="trigger word")
    c.add_argument("--resolution", type=int, default=1024)
    c.add_argument("--description", default="")
    c.add_argument("--prefix", default="", help="caption prefix used in training")
    c.add_argument("--suffix", default="", help="caption suffix used in training")
    c.set_defaults(handler=run_create)
    a = dsub.add_parser("add", help="add images (files, folders or zips; same-stem .txt captions kept)")
    a.add_argument("name")
    a.add_argument("paths", nargs="+")
    a.add_argument("--as-admin", action="store_true", help="add to another user's dataset (admins only; recorded)")
    a.set_defaults(handler=run_add)
    k = dsub.add_parser("check", help="validation report: problems per image with the fix")
    k.add_argument("name")
    k.add_argument("--model", help="also count caption tokens with this base model's tokenizer (name or folder)")
    k.set_defaults(handler=run_check)
    s = dsub.add_parser("stats", help="dataset statistics")
    s.add_argument("name")
    s.set_defaults(handler=run_stats)
    p.set_defaults(handler=run_list)


def run_list(args) -> int:
    from zimage.data.manage import dataset_rows
    from zimage.settings import get_settings

    rows = dataset_rows(get_settings())
    print(f"{'NAME':<24} {'TYPE':<10} {'IMAGES':>6} {'CAPTIONED':>9} {'RES':>5}  TRIGGER")
    for r in rows:
        res = r["resolution"] if r["resolution"] is not None else "-"
        print(f"{r['name']:<24} {r['type']:<10} {r['images']:>6} {r['captioned']:>9} {res:>5}  {r['trigger word']}")
        if r["problem"]:
            print(f"{'':<24} {r['problem']}")
    return 0


def run_create(args) -> int:
    from zimage.auth import cli_actor
    from zimage.data.manage import create_dataset
    from zimage.settings import get_settings

    settings = get_settings().ensure()
    folder = create_dataset(
        settings, args.name, actor=cli_actor(settings), type=args.type, trigger_word=args.trigger, resolution=args.resolution,
        description=args.description, caption_prefix=args.prefix, caption_suffix=args.suffix,
    )  # fmt: skip
    print(f"created {folder.path}")
    return 0


def run_add(args) -> int:
    from zimage.auth import cli_actor
    from zimage.data.manage import open_dataset
    from zimage.data.uploads import UploadReport, add_files, add_folder, add_zip
    from zimage.errors import UserError
    from zimage.settings import get_settings

    settings = get_settings()
    folder = open_dataset(settings, args.name)
    actor = cli_actor(settings, as_admin=args.as_admin)
    missing = [raw for raw in args.paths if not Path(raw).expanduser().exists()]
    if missing:  # checked first, so nothing is half-added
        raise UserError(f"{', '.join(missing)}: no such file or folder")
    total = UploadReport()
    files = []
    for raw in args.paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            part = add_folder(folder, path, actor=actor)
        elif path.suffix.lower() == ".zip" and path.is_file():
            part = add_zip(folder, path, actor=actor)
        else:
            files.append(path)
            continue
        total.accepted += part.accepted
        total.refused += part.refused
    if files:
        # Files go in together so a .txt caption given next to its image is kept with it.
        part = add_files(folder, [(p.name, p.read_bytes()) for p in files], actor=actor)
        total.accepted += part.accepted
        total.refused += part.refused
    for a in total.accepted:
        print(f"added    {a.source} -> {a.stored} ({a.width}x{a.height}{', caption' if a.caption else ''})")
    for r in total.refused:
        print(f"refused  {r.source}: {r.reason}")
    print(total.summary())
    return 0


def run_check(args) -> int:
    from zimage.data.manage import open_dataset
    from zimage.data.report import report_summary, validate_dataset
    from zimage.settings import get_settings

    settings = get_settings()
    folder = open_dataset(settings, args.name)
    model_dir = None
    if getattr(args, "model", None):
        from zimage.catalogue import resolve

        model_dir = resolve(args.model, settings)[1]
    problems = validate_dataset(folder, model_dir)
    for p in problems:
        print(f"{p.level:<8} {p.image}: {p.message}\n         fix: {p.fix}")
    print(report_summary(problems, len(folder.items())))
    return 1 if any(p.level == "error" for p in problems) else 0


def run_stats(args) -> int:
    from zimage.data.manage import open_dataset
    from zimage.data.stats import dataset_stats
    from zimage.settings import get_settings

    s = dataset_stats(open_dataset(get_settings(), args.name))
    print(
        f"images {s.images}, captioned {s.captioned}, without caption {len(s.uncaptioned)}, unreadable {len(s.unreadable)}"
    )
    for title, counts in (("resolutions", s.resolutions), (f"buckets at {s.resolution}px", s.buckets),
                          ("caption length", s.caption_length_bins)):  # fmt: skip
        print(f"{title}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0
