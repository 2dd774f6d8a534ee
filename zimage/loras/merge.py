"""Weighted LoRA merges: exact, to a smaller rank by SVD, or baked into a transformer (a fine-tune).

Each input LoRA i adds dW_i = (alpha_i / rank_i) * up_i @ down_i to a layer; the merge adds
sum_i w_i * dW_i. Three ways to write that down:

- exact (`merge_exact`): per layer, the downs (each scaled by w_i * alpha_i / rank_i) are stacked and the
  ups put side by side, so up @ down is the weighted sum itself, with alpha = merged rank (scale 1). Its
  rank is the sum of the inputs' ranks on that layer. Saved fp32 by default: a bf16 copy of the scaled
  downs would round the exactness away.
- SVD (`merge_svd`): the summed dW of each layer cut to rank R by its singular value decomposition; the
  relative Frobenius error kept is reported per layer and overall. dW is never formed: with
  up = Qu Ru and down^T = Qd Rd (QR), dW = Qu (Ru Rd^T) Qd^T, so only the small k x k core goes through
  torch.linalg.svd (k = summed rank), which is what makes a 30-layer model take seconds, not minutes.
- into a model (`bake_into_model`): the exact merge loaded as one peft adapter into the base transformer,
  fused (diffusers' fuse_lora) and unloaded, then written as a fine-tune folder (finetune.py's layout).

LoRAs on different layer sets merge as their union. A layer whose shapes differ between inputs, or
inputs whose metadata names different base models, is a UserError naming both files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from zimage.errors import UserError
from zimage.settings import Settings


@dataclass(frozen=True)
class MergeInput:
    path: Path
    weight: float


@dataclass
class MergeResult:
    path: Path
    modules: int
    rank: int  # the largest rank of any layer in the output
    method: str  # "exact" | "svd" | "into-model"
    relative_error: float | None = None  # SVD: ||dW - approx||_F / ||dW||_F over every layer
    worst_layer: tuple[str, float] | None = None  # SVD: the layer with the largest relative error
    layer_errors: dict[str, float] = field(default_factory=dict)


def parse_spec(spec: str) -> MergeInput:
    """'A.safetensors:0.8' -> MergeInput(A.safetensors, 0.8); no ':weight' means 1.0."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        path, weight = spec, "1"
    try:
        w = float(weight)
    except ValueError:
        raise UserError(f"{spec}: the weight after ':' must be a number, e.g. {path or spec}:0.8") from None
    if not math.isfinite(w):
        raise UserError(f"{spec}: the weight must be a finite number")
    return MergeInput(Path(path).expanduser(), w)


def resolve_input(settings: Settings, spec: MergeInput) -> MergeInput:
    """A path as given, or a library name (`my-lora`, `merged/x`) turned into its file."""
    if spec.path.is_file():
        return spec
    from zimage.loras.library import get_item

    item = get_item(settings, str(spec.path), kind="lora")
    return MergeInput(item.path, spec.weight)


def load_inputs(inputs: list[MergeInput]):
    """[(LoraFile, weight, path)], checked: one base model, one shape per layer, at least two LoRAs."""
    from zimage.training.lora_io import read_lora

    if len(inputs) < 2:
        raise UserError("merge: give at least two LoRAs, e.g. A.safetensors:0.8 B.safetensors:0.5")
    loaded = [(read_lora(i.path), i.weight, i.path) for i in inputs]
    bases = {p.name: f.metadata.get("base_model") for f, _w, p in loaded if f.metadata.get("base_model")}
    if len(set(bases.values())) > 1:
        shown = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise UserError(f"merge: the LoRAs were trained on different base models ({shown})")
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for lora, _w, path in loaded:
        for module, m in lora.modules.items():
            shape = (int(m.up.shape[0]), int(m.down.shape[1]))
            seen = shapes.setdefault(module, (shape, path.name))
            if seen[0] != shape:
                raise UserError(
                    f"merge: layer {module} is {seen[0][0]}x{seen[0][1]} in {seen[1]} but {shape[0]}x{shape[1]} "
                    f"in {path.name}: these LoRAs are for different models"
                )
    return loaded


def merge_exact(loaded) -> dict:
    """{module: LoraModule} whose up @ down is sum_i w_i * dW_i exactly (alpha = merged rank)."""
    import torch

    from zimage.training.lora_io import LoraModule

    parts: dict[str, tuple[list, list]] = {}
    for lora, weight, _path in loaded:
        for module, m in lora.modules.items():
            downs, ups = parts.setdefault(module, ([], []))
            downs.append(m.down.float() * (weight * m.scale))
            ups.append(m.up.float())
    out = {}
    for module, (downs, ups) in parts.items():
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        out[module] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
    return out


def merge_svd(loaded, rank: int) -> tuple[dict, dict[str, float], float]:
    """({module: LoraModule} of rank <= `rank`, {module: relative error}, overall relative error)."""
    import torch

    from zimage.training.lora_io import LoraModule

    if rank < 1:
        raise UserError(f"--rank {rank}: must be 1 or more")
    out, errors = {}, {}
    total_err2 = total_norm2 = 0.0
    for module, m in merge_exact(loaded).items():
        qu, ru = torch.linalg.qr(m.up.double())  # up = Qu Ru
        qd, rd = torch.linalg.qr(m.down.double().T)  # down^T = Qd Rd
        u, s, vh = torch.linalg.svd(ru @ rd.T)  # dW = Qu (U S Vh) Qd^T, scale 1
        r = min(rank, int(s.shape[0]))
        root = s[:r].sqrt()
        up = (qu @ u[:, :r]) * root
        down = root[:, None] * (vh[:r] @ qd.T)
        norm2, err2 = float((s**2).sum()), float((s[r:] ** 2).sum())
        errors[module] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        total_err2, total_norm2 = total_err2 + err2, total_norm2 + norm2
        out[module] = LoraModule(down=down.float(), up=up.float(), alpha=float(r))
    overall = math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0
    return out, errors, overall


def merged_metadata(loaded, method: str, rank: int | None = None) -> dict[str, str]:
    """The merged file's metadata: the shared fields of the inputs, what went in, and how."""
    from zimage import SOFTWARE_NAME, __version__

    metas = [f.metadata for f, _w, _p in loaded]
    out: dict[str, str] = {}
    for key in ("base_model", "base_model_type", "resolution", "training_adapter"):
        values = {m.get(key) for m in metas if m.get(key)}
        if len(values) == 1:
            out[key] = values.pop()
    triggers = [m.get("trigger_word") for m in metas if m.get("trigger_word")]
    out["trigger_word"] = ", ".join(dict.fromkeys(triggers))
    out["merged_from"] = json.dumps(
        [{"file": p.name, "weight": w, "base_model": f.metadata.get("base_model"),
          "trigger_word": f.metadata.get("trigger_word"), "dataset_name": f.metadata.get("dataset_name"),
          "dataset_hash": f.metadata.get("dataset_hash"), "lora_rank": f.metadata.get("lora_rank"),
          "lora_alpha": f.metadata.get("lora_alpha"), "steps": f.metadata.get("steps")} for f, w, p in loaded]
    )  # fmt: skip
    out["merge_method"] = method
    datasets = [m.get("dataset_name") for m in metas if m.get("dataset_name")]
    out["dataset_name"] = " + ".join(dict.fromkeys(datasets))
    out["software"], out["software_version"] = SOFTWARE_NAME, __version__
    if rank is not None:
        out["lora_rank"] = out["lora_alpha"] = str(rank)
    return out


def _target(settings: Settings, output: str | Path, suffix: str = ".safetensors") -> Path:
    """-o NAME (into models/loras/merged/) or a path; an existing file is refused, never replaced."""
    out = Path(output).expanduser()
    if len(out.parts) == 1 and not out.is_absolute():  # a bare name: the library's merged folder
        out = settings.models_dir / "loras" / "merged" / out.name
    if suffix and out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    if out.exists():
        raise UserError(f"{out}: already exists; choose another name (nothing is overwritten)")
    return out


def _may_create(settings: Settings, actor, what: str) -> None:
    """A merge writes a new file: members and admins may (a viewer is refused); `actor` None is the CLI's user."""
    from zimage.auth import default_actor, require

    require(default_actor(settings, actor), "create", what=what)


def merge_loras(settings: Settings, inputs: list[MergeInput], output: str | Path, rank: int | None = None,
                dtype: str = "fp32", actor=None) -> MergeResult:  # fmt: skip
    """Merge `inputs` into one LoRA file at `output` (exact, or SVD to `rank`); returns what was written."""
    from zimage.training import lora_io

    _may_create(settings, actor, f"merged LoRA {output}")
    if dtype not in lora_io.DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(lora_io.DTYPES)}")
    loaded = load_inputs([resolve_input(settings, i) for i in inputs])
    target = _target(settings, output)
    if rank is None:
        modules, errors, overall = merge_exact(loaded), {}, None
    else:
        modules, errors, overall = merge_svd(loaded, rank)
    top = max(m.rank for m in modules.values())
    meta = merged_metadata(loaded, "exact" if rank is None else "svd", top)
    if overall is not None:
        meta["merge_relative_error"] = f"{overall:.6g}"
    target.parent.mkdir(parents=True, exist_ok=True)
    lora_io.save_lora(target, modules, meta, dtype=lora_io.DTYPES[dtype])
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else None
    return MergeResult(path=target, modules=len(modules), rank=top, method="exact" if rank is None else "svd",
                       relative_error=overall, worst_layer=worst, layer_errors=errors)  # fmt: skip


def bake_into_model(settings: Settings, inputs: list[MergeInput], output: str, base: str | None = None,
                    dtype: str = "bf16", actor=None) -> MergeResult:  # fmt: skip
    """The weighted LoRAs fused into the base transformer, written as models/finetuned/<output>/."""
    from zimage import catalogue
    from zimage.fsio import atomic_folder
    from zimage.training import lora_io, zimage_math

    _may_create(settings, actor, f"fine-tune {output}")
    if dtype not in lora_io.DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(lora_io.DTYPES)}")
    loaded = load_inputs([resolve_input(settings, i) for i in inputs])
    base = base or next((f.metadata["base_model"] for f, _w, _p in loaded if f.metadata.get("base_model")), None)
    if not base:
        raise UserError("--into-model: the LoRAs do not say their base model; give it with --base NAME")
    _entry, model_dir = catalogue.resolve(base, settings)
    name = Path(output).name
    target = settings.finetuned_dir / name
    if target.exists():
        raise UserError(f"{target}: already exists; choose another name (nothing is overwritten)")
    transformer = zimage_math.load_transformer(model_dir)
    known = {n for n, _ in transformer.named_modules()}
    merged = merge_exact(loaded)
    missing = sorted(set(merged) - known)
    if missing:
        raise UserError(
            f"--into-model: {base} has no layer {missing[0]} (and {len(missing) - 1} more) that the LoRAs adapt"
        )
    lora_io.load_into_transformer(transformer, lora_io.LoraFile(modules=merged), "merged")
    transformer.fuse_lora(lora_scale=1.0, adapter_names=["merged"])
    transformer.unload_lora()
    meta = merged_metadata(loaded, "into-model")
    meta["base_model"] = base
    with atomic_folder(target) as tmp:
        transformer.to(lora_io.DTYPES[dtype])
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size="5GB")
        (tmp / "zimage_finetune.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return MergeResult(path=target, modules=len(merged), rank=max(m.rank for m in merged.values()), method="into-model")
