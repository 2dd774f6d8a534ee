"""A LoRA for mflux (MLX, Apple silicon): the file mflux 0.24 loads for Z-Image, and the command to run it.

Facts read from mflux 0.24.0 (MIT; installed in a separate venv to read it, never a dependency here):
`mflux/models/z_image/weights/z_image_lora_mapping.py` (ZImageLoRAMapping) accepts, per Z-Image block
(layers / noise_refiner / context_refiner, block index N), the keys

    diffusion_model.<block>.N.<module>.lora_A.weight / .lora_B.weight / .alpha     (also lora_down/lora_up,
    transformer.-prefixed, unprefixed and kohya lora_unet_ names)

for <module> in adaLN_modulation.0, attention.to_q / to_k / to_v / to_out.0, feed_forward.w1 / w2 / w3,
and the global layers all_x_embedder.2-1, all_final_layer.2-1.linear, all_final_layer.2-1.adaLN_modulation.1,
cap_embedder.1, t_embedder.mlp.0 / mlp.2. Its loader (mflux/models/common/lora/mapping/lora_loader.py)
scales lora_B by alpha / rank, exactly the diffusers convention, and refuses a file with layers it cannot
apply. So the studio's own format (lora_io, DESIGN.md section 4) is already what mflux reads: the export
re-writes any LoRA the studio can read (kohya, diffusers, ComfyUI styles, fused qkv split) into that
format, checks every layer against the list above, and stores it as float16 or bfloat16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import UserError
from zimage.settings import Settings

MFLUX_VERSION = "0.24"
BLOCK_MODULES = ("adaLN_modulation.0", "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # fmt: skip
GLOBAL_MODULES = ("all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
                  "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")  # fmt: skip
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(.+)$")
COMMANDS = {
    "turbo": "mflux-generate-z-image-turbo",
    "base": "mflux-generate-z-image",
    "de_turbo": "mflux-generate-z-image",
}


@dataclass
class MlxExport:
    path: Path
    modules: int
    command: str
    mflux_version: str = MFLUX_VERSION


def mflux_loads(module: str) -> bool:
    """True when mflux 0.24's Z-Image LoRA mapping has a target for this diffusers module path."""
    m = _BLOCK.match(module)
    if m:
        return m.group(2) in BLOCK_MODULES and not (m.group(1) == "context_refiner" and m.group(2).startswith("adaLN"))
    return module in GLOBAL_MODULES


def mac_command(file_name: str, model_type: str | None, trigger: str | None) -> str:
    """The command to run on the Mac, next to the exported file."""
    tool = COMMANDS.get(model_type or "", COMMANDS["turbo"])
    prompt = f"{trigger}, a photo" if trigger else "a photo"
    steps = 9 if tool == COMMANDS["turbo"] else 50
    return f'{tool} --prompt "{prompt}" --lora-paths {file_name} --lora-scales 1.0 --steps {steps} --seed 42'


def export_mlx(settings: Settings, name: str, output: str | Path | None = None, dtype: str = "fp16") -> MlxExport:
    """Write LoRA `name` as the file mflux loads; returns it with the Mac command."""
    from zimage.loras.library import get_item
    from zimage.training import lora_io

    if dtype not in ("fp16", "bf16"):
        raise UserError(f"--dtype {dtype}: fp16 or bf16 (MLX reads both)")
    item = get_item(settings, name, kind="lora")
    if item.damaged:
        raise UserError(f"{item.name}: damaged ({item.problem}); not exporting it")
    lora = lora_io.read_lora(item.path)
    unknown = sorted(m for m in lora.modules if not mflux_loads(m))
    if unknown:
        raise UserError(f"{item.name}: mflux {MFLUX_VERSION} has no Z-Image target for {unknown[0]}"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))  # fmt: skip
    target = (
        Path(output).expanduser() if output else settings.models_dir / "loras" / "mlx" / f"{item.path.stem}.safetensors"
    )
    if target.exists():
        raise UserError(f"{target}: already exists; choose another -o (nothing is overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {**lora.metadata, "exported_for": f"mflux {MFLUX_VERSION}"}
    lora_io.save_lora(target, lora.modules, meta, dtype=lora_io.DTYPES[dtype])
    command = mac_command(target.name, item.metadata.get("base_model_type"), item.metadata.get("trigger_word"))
    return MlxExport(path=target, modules=len(lora.modules), command=command)
