"""`zimage models [list]`: base models and captioners, and what is here; `zimage models download NAME` fetches one.

A captioner counts as here when its folder is under models/captioners/ or a complete copy is in the
Hugging Face cache (HF_HOME); neither check touches the network.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list base models and captioners; `models download NAME` fetches one")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser("list", help="base models and captioners, and which are here")
    ls.set_defaults(handler=run_list)
    d = msub.add_parser("download", help="download a base model (and its training adapter) or a captioner")
    d.add_argument("name", help="catalogue name, e.g. z-image-turbo, blip-base, florence-2-base")
    d.set_defaults(handler=run_download)
    p.set_defaults(handler=run_list)


def run_list(args) -> int:
    from zimage.captioning.models import captioner_rows
    from zimage.catalogue import list_models
    from zimage.settings import get_settings

    settings = get_settings()
    rows = list_models(settings)
    print("BASE MODELS")
    print(f"{'NAME':<22} {'TYPE':<9} {'SAMPLING':<14} {'STATUS':<12} SOURCE")
    for row in rows:
        e = row.entry
        status = "ready" if row.path else ("broken" if row.problem else "not local")
        source = e.repo_id or (str(row.path) if row.path else "local")
        print(
            f"{e.name:<22} {e.model_type:<9} {f'{e.sample_steps} st, CFG {e.sample_cfg:g}':<14} {status:<12} {source}"
        )
        if e.adapter:
            print(f"{'':<22} training adapter: {e.adapter.repo_id}/{e.adapter.filename}")
        if row.problem:
            print(f"{'':<22} {row.problem}")
    print("\nCAPTIONERS")
    print(f"{'NAME':<22} {'SIZE':<9} {'STATUS':<27} SOURCE")
    for r in captioner_rows(settings):
        print(f"{r['name']:<22} {r['size']:<9} {r['status']:<27} {r['source']}")
    return 0


def run_download(args) -> int:
    from zimage.captioning.models import download_captioner, known_captioner
    from zimage.catalogue import download, download_adapter, known
    from zimage.settings import get_settings

    settings = get_settings()
    if known(args.name) is None and known_captioner(args.name) is not None:
        print(f"ready: {download_captioner(args.name, settings, progress=print)}")
        return 0
    folder = download(args.name, settings, progress=print)
    print(f"ready: {folder}")
    entry = known(args.name)
    if entry and entry.adapter:
        print(f"training adapter: {download_adapter(entry.adapter, settings)}")
    return 0
