"""`zimage loras list|show|delete|merge|push|export`: the LoRAs library from the command line.

zimage loras list                        every LoRA and fine-tune in the home (damaged ones with the reason)
zimage loras show NAME                   its metadata ("unknown" where the file does not say), run, samples
zimage loras delete NAME [--yes]         as the OS user (owner or admin, once access rules apply)
zimage loras merge A.safetensors:0.8 B:0.5 -o C [--rank R | --into-model [--base M]]
zimage loras push NAME --repo user/name [--private]
zimage loras export NAME --mlx           the file mflux loads on a Mac, with the command to run there
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("loras", help="the LoRAs library: list, show, delete, merge, push to the Hub, export")
    lsub = p.add_subparsers(dest="loras_command", metavar="ACTION")
    ls = lsub.add_parser("list", help="every LoRA and fine-tune under models/")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(handler=run_list)
    show = lsub.add_parser("show", help="one LoRA's metadata, run and last samples")
    show.add_argument("name")
    show.set_defaults(handler=run_show)
    rm = lsub.add_parser("delete", help="delete a LoRA (and its text encoder part) or a fine-tune folder")
    rm.add_argument("name")
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.add_argument("--as-admin", action="store_true", help="act as admin (the users file must give you that role)")
    rm.set_defaults(handler=run_delete)
    mg = lsub.add_parser("merge", help="weighted merge: exact, --rank R (SVD), or --into-model (a fine-tune)")
    mg.add_argument("inputs", nargs="+", metavar="LORA[:WEIGHT]", help="a file or library name, weight 1.0 if omitted")
    mg.add_argument("-o", "--output", required=True, help="a name (goes to models/loras/merged/) or a path")
    mg.add_argument("--rank", type=int, help="cut every layer to this rank by SVD (reports the error kept)")
    mg.add_argument("--into-model", action="store_true", help="bake into the base transformer: models/finetuned/NAME")
    mg.add_argument("--base", help="--into-model: the base model (default: the LoRAs' base_model metadata)")
    mg.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default fp32 for a LoRA, bf16 for a model)")
    mg.set_defaults(handler=run_merge)
    push = lsub.add_parser("push", help="upload a LoRA, its model card and samples to the Hugging Face Hub")
    push.add_argument("name")
    push.add_argument("--repo", required=True, help="user/name on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--dry-run", action="store_true", help="write the upload folder and print it; upload nothing")
    push.add_argument("--as-admin", action="store_true", help="act as admin (the users file must give you that role)")
    push.set_defaults(handler=run_push)
    ex = lsub.add_parser("export", help="export a LoRA for another runtime (--mlx: mflux on Apple silicon)")
    ex.add_argument("name")
    ex.add_argument("--mlx", action="store_true", required=True, help="the layout mflux 0.24 loads")
    ex.add_argument("-o", "--output", help="the file to write (default: models/loras/mlx/NAME.safetensors)")
    ex.set_defaults(handler=run_export)
    p.set_defaults(handler=run_list, json=False)


def run_list(args) -> int:
    import json

    from zimage.loras.library import describe, list_items
    from zimage.settings import get_settings

    items = list_items(get_settings())
    if args.json:
        for item in items:
            print(json.dumps(describe(item)))
        return 0
    if not items:
        print("No LoRAs or fine-tunes yet (models/loras/, models/finetuned/).")
        return 0
    print(f"{'NAME':<32} {'KIND':<9} {'SIZE':>9} {'BASE':<18} {'TRIGGER':<14} {'RANK':<6} RUN")
    for item in items:
        d = describe(item)
        if item.damaged:
            print(f"{item.name:<32} {item.kind:<9} {d['size']:>9} DAMAGED: {item.problem}")
            continue
        print(f"{item.name:<32} {item.kind:<9} {d['size']:>9} {d['base model'][:18]:<18} "
              f"{d['trigger word'][:14]:<14} {d['rank'].split()[0]:<6} {d['run']}")  # fmt: skip
    return 0


def run_show(args) -> int:
    from zimage.loras.library import describe, get_item, last_samples
    from zimage.settings import get_settings

    item = get_item(get_settings(), args.name)
    for key, value in describe(item).items():
        print(f"{key:<14} {value}")
    for s in last_samples(item):
        print(f"sample         step {s['step']}, seed {s['seed']}: {s['prompt']!r} -> {s['path']}")
    return 0


def run_delete(args) -> int:
    from zimage.auth import cli_actor
    from zimage.loras.library import delete_item, get_item
    from zimage.settings import get_settings

    settings = get_settings()
    item = get_item(settings, args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"error: deleting {item.path} needs --yes when there is no terminal to ask", file=sys.stderr)
            return 2
        if input(f"Delete {item.path}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Nothing deleted.")
            return 1
    gone = delete_item(settings, item.name, user=None, kind=item.kind, actor=cli_actor(settings, args.as_admin))
    print(f"deleted {gone.path}")
    return 0


def run_merge(args) -> int:
    from zimage.loras.merge import bake_into_model, merge_loras, parse_spec
    from zimage.settings import get_settings

    settings = get_settings()
    inputs = [parse_spec(s) for s in args.inputs]
    if args.into_model:
        if args.rank is not None:
            print("error: --rank and --into-model do not go together", file=sys.stderr)
            return 2
        result = bake_into_model(settings, inputs, args.output, base=args.base, dtype=args.dtype or "bf16")
        print(f"baked {len(inputs)} LoRAs ({result.modules} layers) into {result.path}")
        return 0
    result = merge_loras(settings, inputs, args.output, rank=args.rank, dtype=args.dtype or "fp32")
    print(
        f"merged {len(inputs)} LoRAs -> {result.path} ({result.modules} layers, rank up to {result.rank}, {result.method})"
    )
    if result.relative_error is not None:
        layer, worst = result.worst_layer or ("-", 0.0)
        print(
            f"relative error kept (Frobenius, all layers): {result.relative_error:.4%}; worst layer {layer}: {worst:.4%}"
        )
    return 0


def run_push(args) -> int:
    from zimage.auth import cli_actor
    from zimage.loras.hub import push_lora
    from zimage.settings import get_settings

    settings = get_settings()
    actor = None if args.dry_run else cli_actor(settings, args.as_admin)
    plan = push_lora(settings, args.name, args.repo, private=args.private, dry_run=args.dry_run, actor=actor)
    files = ", ".join(sorted(plan.files))
    if args.dry_run:
        print(f"would upload to {plan.repo_id} ({'private' if plan.private else 'public'}): {files}")
        print(f"folder: {plan.folder}")
    else:
        print(f"uploaded to https://huggingface.co/{plan.repo_id}: {files}")
    return 0


def run_export(args) -> int:
    from zimage.loras.mlx import export_mlx
    from zimage.settings import get_settings

    result = export_mlx(get_settings(), args.name, args.output)
    print(f"wrote {result.path} ({result.modules} layers) for mflux {result.mflux_version}")
    print("On the Mac (pip install mflux):")
    print(f"  {result.command}")
    return 0
