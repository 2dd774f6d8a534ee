"""A full fine-tune as one ComfyUI checkpoint: the transformer in ComfyUI's own Z-Image key layout.

ComfyUI's Z-Image model is its Lumina 2 / NextDiT class with fused attention; the names below are facts
read from ComfyUI (GPL-3.0; read, not copied): `z_image_to_diffusers` in comfy/utils.py of
Comfy-Org/ComfyUI at commit b3be02d6e766a8d3743dcf99cc967118f3ec8e3e (the diffusers -> ComfyUI key map),
and the Lumina 2 branch of `detect_unet_config` in comfy/model_detection.py (a9fc7512309a2e357f65f48fa770945c56bc0d50
in the same repository), which recognises the model by `cap_embedder.1.weight` together with
`noise_refiner.0.attention.k_norm.weight` and reads dim, layers and heads from the shapes.

    diffusers (our transformer/ folder)               ComfyUI
    <block>.attention.to_q / to_k / to_v .weight      <block>.attention.qkv.weight   (q, k, v stacked on dim 0)
    <block>.attention.norm_q / norm_k .weight         <block>.attention.q_norm / k_norm .weight
    <block>.attention.to_out.0.weight                 <block>.attention.out.weight
    <block>.{attention_norm1,2, ffn_norm1,2, feed_forward.w1,w2,w3, adaLN_modulation.0}   unchanged
    all_x_embedder.2-1.*                              x_embedder.*
    all_final_layer.2-1.{linear, adaLN_modulation.1}.*  final_layer.{linear, adaLN_modulation.1}.*
    cap_embedder.*, t_embedder.mlp.*, x_pad_token, cap_pad_token   unchanged
(<block> = layers.N, noise_refiner.N, context_refiner.N.) Keys carry no prefix, as a file for ComfyUI's
models/diffusion_models/ (the "Load Diffusion Model" node). A key the map does not know is an error,
never dropped. fp8_e4m3fn casts the matrices (2-D weights, clamped to +-448) and keeps norms, biases and
pad tokens in bf16, as ComfyUI's own fp8 files do; ComfyUI computes in its compute dtype either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import UserError
from zimage.settings import Settings

BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")
RENAMED_IN_BLOCK = {"attention.norm_q.weight": "attention.q_norm.weight", "attention.norm_k.weight": "attention.k_norm.weight",
                    "attention.to_out.0.weight": "attention.out.weight", "attention.to_out.0.bias": "attention.out.bias"}  # fmt: skip
SAME_IN_BLOCK = {f"{m}.{e}" for m in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "feed_forward.w1",
                                     "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0") for e in ("weight", "bias")}  # fmt: skip
TOP = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.linear.": "final_layer.linear.",
       "all_final_layer.2-1.adaLN_modulation.1.": "final_layer.adaLN_modulation.1."}  # fmt: skip
SAME_TOP = ("cap_embedder.0.weight", "cap_embedder.1.weight", "cap_embedder.1.bias", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "x_pad_token", "cap_pad_token")  # fmt: skip
DTYPES = ("bf16", "fp8_e4m3fn")
FP8_MAX = 448.0


@dataclass
class ComfyExport:
    path: Path
    tensors: int
    dtype: str


def comfy_key(key: str) -> str | None:
    """The ComfyUI name of one diffusers transformer key (None for to_q/k/v: they fuse into qkv)."""
    m = BLOCK.match(key)
    if m:
        block, rest = m.groups()
        if re.fullmatch(r"attention\.to_[qkv]\.(weight|bias)", rest):
            return None
        if rest in RENAMED_IN_BLOCK:
            return f"{block}.{RENAMED_IN_BLOCK[rest]}"
        if rest in SAME_IN_BLOCK:
            return key
    for src, dst in TOP.items():
        if key.startswith(src) and key[len(src) :] in ("weight", "bias"):
            return dst + key[len(src) :]
    if key in SAME_TOP:
        return key
    raise UserError(f"{key}: a transformer key the ComfyUI Z-Image layout has no name for; not exporting")


def _read_transformer(folder: Path) -> dict:
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards or not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a diffusers transformer folder (config.json + safetensors weights)")
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                tensors[key] = fh.get_tensor(key)
    return tensors


def comfy_state_dict(tensors: dict, dtype: str = "bf16") -> dict:
    """The diffusers transformer `tensors` in ComfyUI's key layout and `dtype`."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    out = {}
    for key, value in tensors.items():
        name = comfy_key(key)
        if name is not None:
            out[name] = value
    for key in tensors:
        m = BLOCK.match(key)
        if m and m.group(2) in ("attention.to_q.weight", "attention.to_q.bias"):
            end = m.group(2).rsplit(".", 1)[1]
            parts = [tensors.get(f"{m.group(1)}.attention.to_{p}.{end}") for p in "qkv"]
            if any(p is None for p in parts):
                raise UserError(f"{m.group(1)}: has to_q but not all of to_k / to_v; not exporting")
            out[f"{m.group(1)}.attention.qkv.{end}"] = torch.cat(parts, dim=0)
    for name, value in out.items():
        if dtype == "fp8_e4m3fn" and value.ndim == 2 and name.endswith(".weight"):
            out[name] = value.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
        else:
            out[name] = value.to(torch.bfloat16).contiguous()
    return out


def export_finetune(
    settings: Settings, name: str, output: str | Path | None = None, dtype: str = "bf16"
) -> ComfyExport:
    """Write fine-tune `name` (models/finetuned/<name>/) as one ComfyUI checkpoint; returns what was written."""
    import json

    from safetensors.torch import save_file

    from zimage import SOFTWARE_NAME, __version__
    from zimage.fsio import atomic_path
    from zimage.loras.library import get_item

    item = get_item(settings, name, kind="finetune")
    if item.damaged:
        raise UserError(f"{item.name}: damaged ({item.problem}); not exporting it")
    target = (
        Path(output).expanduser()
        if output
        else settings.models_dir / "exports" / "comfyui" / f"{item.name}-{dtype}.safetensors"
    )
    if target.exists():
        raise UserError(f"{target}: already exists; choose another -o (nothing is overwritten)")
    tensors = comfy_state_dict(_read_transformer(item.path / "transformer"), dtype)
    meta = {"software": SOFTWARE_NAME, "software_version": __version__, "format": "pt", "zimage_layout": "comfyui",
            "base_model": item.metadata.get("base_model", ""), "zimage_finetune": json.dumps(item.metadata)}  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, overwrite=False) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return ComfyExport(path=target, tensors=len(tensors), dtype=dtype)
