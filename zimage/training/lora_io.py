"""LoRA files: write the one format both diffusers and ComfyUI load; read the styles people bring.

Written (DESIGN.md section 4):
    diffusion_model.<diffusers module path>.lora_A.weight   (rank, in)
    diffusion_model.<diffusers module path>.lora_B.weight   (out, rank)
    diffusion_model.<diffusers module path>.alpha           scalar, so alpha != rank survives
plus string metadata (base model, trigger word, rank, alpha, steps, dataset, config, software).
No fused `qkv` keys: diffusers drops them silently.

Read: that format, diffusers/peft keys (`transformer.` prefix or none, lora_A/lora_B), ComfyUI /
ai-toolkit `diffusion_model.` keys with lora_down/lora_up, and kohya `lora_unet_` keys (underscored
module paths, fused attention qkv split into q/k/v).

The reader stays hand-written: diffusers' Z-Image converter (`ZImagePipeline.lora_state_dict`) folds
alpha into the weights, so the rank and alpha of a file are lost (they are shown and written back), and
it passes keys it does not know on instead of naming them in an error. Loading into a model goes through
diffusers / peft (`load_into_transformer`, `peft_modules`, `peft_state`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage.errors import UserError
from zimage.fsio import atomic_path

PREFIX = "diffusion_model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
# Kohya names flatten module paths with "_"; these are Z-Image's names that keep an underscore.
_KOHYA_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)_(\d+)_(.+)$")
_KOHYA_INNER = {
    "attention_to_q": "attention.to_q",
    "attention_to_k": "attention.to_k",
    "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0",
    "attention_out": "attention.to_out.0",
    "attention_qkv": "attention.qkv",
    "feed_forward_w1": "feed_forward.w1",
    "feed_forward_w2": "feed_forward.w2",
    "feed_forward_w3": "feed_forward.w3",
    "adaLN_modulation_0": "adaLN_modulation.0",
}
_KOHYA_TOP = {
    "all_x_embedder_2-1": "all_x_embedder.2-1",
    "all_final_layer_2-1_linear": "all_final_layer.2-1.linear",
    "all_final_layer_2-1_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder_mlp_0": "t_embedder.mlp.0",
    "t_embedder_mlp_2": "t_embedder.mlp.2",
    "cap_embedder_1": "cap_embedder.1",
}


class LoraFormatError(UserError):
    """A LoRA file this studio cannot read; the message names the file and the key."""


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float | None = None  # None: the loader's convention alpha = rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # diffusers module path -> weights
    metadata: dict[str, str] = field(default_factory=dict)
    style: str = "diffusion_model"  # diffusion_model | diffusers | kohya


def modules_from_peft(state: dict[str, torch.Tensor], alpha: float) -> dict[str, LoraModule]:
    """Turn `peft.get_peft_model_state_dict` output (module.lora_A.weight / lora_B.weight) into modules."""
    downs = {k[: -len(".lora_A.weight")]: v for k, v in state.items() if k.endswith(".lora_A.weight")}
    modules = {}
    for path, down in downs.items():
        up = state.get(f"{path}.lora_B.weight")
        if up is None:
            raise ValueError(f"peft state has {path}.lora_A.weight but no lora_B")
        modules[path] = LoraModule(down=down, up=up, alpha=float(alpha))
    return modules


def peft_modules(model, adapter_name: str, alpha: float) -> dict[str, LoraModule]:
    """The LoRA weights of peft adapter `adapter_name` in `model` (diffusers or transformers), by module path."""
    from peft.utils import get_peft_model_state_dict

    return modules_from_peft(get_peft_model_state_dict(model, adapter_name=adapter_name), alpha)


def peft_state(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """The inverse of modules_from_peft: what `peft.set_peft_model_state_dict` takes (alpha is peft's config)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in modules.items():
        out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = m.down, m.up
    return out


def training_metadata(
    config, steps: int, dataset_name: str, dataset_hash: str, num_images: int, adapter_name: str = ""
) -> dict[str, str]:
    """The string metadata a trained LoRA carries (DESIGN.md section 4); `config` is a TrainingConfig."""
    import json
    import time

    from zimage import SOFTWARE_NAME, __version__

    c = config
    return {
        "software": SOFTWARE_NAME,
        "software_version": __version__,
        "base_model": c.model_path,
        "base_model_type": c.model_type or "",
        "training_adapter": adapter_name,
        "trigger_word": c.trigger_word or "",
        "lora_rank": str(c.lora_rank),
        "lora_alpha": f"{c.lora_alpha:g}",
        "lora_target_modules": ",".join(c.lora_target_modules),
        "lora_target_blocks": ",".join(c.lora_target_blocks),
        "steps": str(steps),
        "resolution": str(c.resolution),
        "dataset_name": dataset_name,
        "dataset_hash": dataset_hash,
        "num_images": str(num_images),
        "training_config": json.dumps(c.to_dict(), sort_keys=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def lora_tensors(modules: dict[str, LoraModule], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors of the written format (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(modules):
        m = modules[path]
        out[f"{PREFIX}{path}.lora_A.weight"] = m.down.detach().to("cpu", dtype).contiguous()
        out[f"{PREFIX}{path}.lora_B.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        out[f"{PREFIX}{path}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
    return out


def save_lora(
    path: Path,
    modules: dict[str, LoraModule],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA file atomically. Without `overwrite` an existing file raises FileExistsError, untouched."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(lora_tensors(modules, dtype), str(tmp), metadata=meta)
    return Path(path)


def _kohya_path(name: str, known: dict[str, str] | None) -> str | None:
    if known is not None:
        return known.get(name)
    if name in _KOHYA_TOP:
        return _KOHYA_TOP[name]
    match = _KOHYA_BLOCK.match(name)
    if match and match.group(3) in _KOHYA_INNER:
        return f"{match.group(1)}.{match.group(2)}.{_KOHYA_INNER[match.group(3)]}"
    return None


def read_lora(path: Path, module_names: Iterable[str] | None = None) -> LoraFile:
    """Read a LoRA file in any supported style into diffusers module paths.

    `module_names` (the transformer's module names) makes kohya names exact; without it the built-in
    Z-Image names are used. Fused attention `qkv` is split into to_q / to_k / to_v.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path.name}: only .safetensors LoRA files are read (pickles are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise LoraFormatError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    metadata.pop("format", None)
    known = {n.replace(".", "_"): n for n in module_names} if module_names is not None else None
    style = "diffusers"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind = next((k for s, k in _SUFFIXES.items() if key.endswith(s)), None)
        if kind is None:
            if key.endswith(".dora_scale") or ".lokr_" in key:
                raise LoraFormatError(f"{path.name}: {key} is DoRA/LoKr, not a plain LoRA")
            raise LoraFormatError(f"{path.name}: unexpected key {key!r} (not lora_A/lora_B/lora_down/lora_up/alpha)")
        base = key[: -len(next(s for s in _SUFFIXES if key.endswith(s)))]
        if base.startswith("lora_unet_"):
            style = "kohya"
            module = _kohya_path(base[len("lora_unet_") :], known)
            if module is None:
                raise LoraFormatError(f"{path.name}: kohya key {key!r} names no Z-Image transformer module")
        else:
            if base.startswith(PREFIX):
                style = "diffusion_model"
            module = base
            for prefix in _PREFIXES:
                module = module.removeprefix(prefix)
            module = module.replace(".default", "")
            module = re.sub(r"\.to\.([qkv])$", r".to_\1", module)
            module = re.sub(r"\.attention\.out$", ".attention.to_out.0", module)
        parts.setdefault(module, {})[kind] = value
    modules: dict[str, LoraModule] = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFormatError(f"{path.name}: {module} has {sorted(p)} but needs both down/A and up/B weights")
        alpha = float(p["alpha"].item()) if "alpha" in p else None
        if module.endswith(".qkv"):
            block = module[: -len(".qkv")]
            for proj, up in zip("qkv", p["up"].chunk(3, dim=0), strict=True):
                modules.setdefault(f"{block}.to_{proj}", LoraModule(down=p["down"], up=up, alpha=alpha))
            continue
        modules[module] = LoraModule(down=p["down"], up=p["up"], alpha=alpha)
    if not modules:
        raise LoraFormatError(f"{path.name}: holds no LoRA weights")
    return LoraFile(modules=modules, metadata=metadata, style=style)


def diffusers_state_dict(lora: LoraFile, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`transformer.`-prefixed lora_A/lora_B keys with alpha / rank folded into lora_A (loaded with alpha = rank)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora.modules.items():
        down = m.down.float() * m.scale
        out[f"transformer.{path}.lora_A.weight"] = down.to(dtype or m.down.dtype)
        out[f"transformer.{path}.lora_B.weight"] = m.up.to(dtype or m.up.dtype)
    return out


def load_into_transformer(transformer, lora: LoraFile | Path, adapter_name: str) -> None:
    """Add `lora` to a diffusers ZImageTransformer2DModel as the peft adapter `adapter_name`."""
    if not isinstance(lora, LoraFile):
        lora = read_lora(Path(lora), module_names=[n for n, _ in transformer.named_modules()])
    state = diffusers_state_dict(lora, dtype=next(transformer.parameters()).dtype)
    transformer.load_lora_adapter(state, adapter_name=adapter_name, prefix="transformer")
