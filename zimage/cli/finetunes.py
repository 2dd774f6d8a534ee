"""`zimage finetunes list|export`: full fine-tunes (models/finetuned/) and their ComfyUI export.

zimage finetunes list
zimage finetunes export NAME --comfy [--dtype bf16|fp8_e4m3fn] [-o FILE]
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("finetunes", help="full fine-tunes: list; export one for ComfyUI")
    fsub = p.add_subparsers(dest="finetunes_command", metavar="ACTION")
    ls = fsub.add_parser("list", help="every fine-tune folder under models/finetuned/")
    ls.set_defaults(handler=run_list)
    ex = fsub.add_parser("export", help="one single-file transformer checkpoint in ComfyUI's Z-Image layout")
    ex.add_argument("name")
    ex.add_argument("--comfy", action="store_true", required=True, help="ComfyUI's key layout (Load Diffusion Model)")
    ex.add_argument("--dtype", default="bf16", choices=("bf16", "fp8_e4m3fn"))
    ex.add_argument("-o", "--output", help="the file (default: models/exports/comfyui/NAME-DTYPE.safetensors)")
    ex.set_defaults(handler=run_export)
    p.set_defaults(handler=run_list)


def run_list(args) -> int:
    from zimage.loras.library import describe, list_items
    from zimage.settings import get_settings

    items = [i for i in list_items(get_settings()) if i.kind == "finetune"]
    if not items:
        print("No fine-tunes yet (models/finetuned/).")
    for item in items:
        d = describe(item)
        print(f"{item.name:<32} {d['size']:>9} {d['state'] if item.damaged else d['base model']}")
    return 0


def run_export(args) -> int:
    from zimage.loras.comfy import export_finetune
    from zimage.settings import get_settings

    result = export_finetune(get_settings(), args.name, args.output, args.dtype)
    print(f"wrote {result.path} ({result.tensors} tensors, {result.dtype}, ComfyUI layout)")
    print("Put it in ComfyUI/models/diffusion_models/ and load it with the Load Diffusion Model node.")
    return 0
