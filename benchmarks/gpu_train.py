#!/usr/bin/env python
"""LoRA training steps of the real trainer (zimage.training.LoraTrainer) on the full-size Z-Image transformer.

Each case builds a config, validates it (zimage.config.validate_config) and drives LoraTrainer through
its public recipe — setup() (dataset scan, cached latents and text, transformer + peft LoRA, optimizer,
accelerate), then train_step() — the code `zimage train` runs. The model folder is the tiny offline pipeline
(zimage.tiny) with its transformer replaced by one of the full Z-Image shape (zimage.training.model_shapes
ZIMAGE_TRANSFORMER_CONFIG: 30 layers, dim 3840, 6.15 B parameters) with random weights: no download. Its
caption embedder takes the tiny text encoder's 32 features instead of Qwen3's 2560 (one input linear of
the 3840-wide stream: under 0.2 % of the parameters and FLOPs). The dataset is 4 square images at the
case's side, so every step trains side x side.

Cases (CUDA): bf16-512, bf16-1024 (bf16, gradient checkpointing, batch 1, LoRA rank 32 on the default
targets, AdamW); 8bit-1024 and nf4-1024 (the frozen transformer loaded through bitsandbytes);
adamw8bit-1024 (bitsandbytes' 8-bit AdamW). Per case, after --warmup untimed steps, --steps steps are
timed with torch.cuda.synchronize() before and after: s/step; peak torch.cuda.max_memory_allocated and
max_memory_reserved over the timed steps; the trainer's own estimate (zimage.training.memory
estimate_memory(config).training_gib, its training phase) and measured/estimate; MFU.

FLOP count per sample (training_flops): a linear costs 2·fan_in·fan_out per token it sees (main layers
see image + caption tokens, noise_refiner image tokens, context_refiner caption tokens, modulation and
timestep linears one row per sample); attention costs 4·T²·D per block (QKᵀ and PV, D = heads x head_dim);
a LoRA costs 2·r·(fan_in + fan_out) per token. Model FLOPs per step = forward + backward input gradients
along the gradient path (its linears once more, its attention twice) + LoRA weight gradients (2 x LoRA
forward); the frozen base's weight gradients are not computed and not counted. Image tokens = (side/16)²
(8x VAE, 2x2 patches), caption tokens = the dataset's longest caption; both padded to 32 as the model does.
MFU = model FLOPs / (s/step x peak); HFU adds gradient checkpointing's recomputed forward. Peak:
--peak-tflops, default 989 TFLOP/s (H200 bf16 dense).

A case that fails (out of memory, a missing library) prints its error and the next case runs; the exit
code is 1 if any case failed. --budget S skips the cases that would start after S seconds.

    python benchmarks/gpu_train.py                    # CUDA: every case
    python benchmarks/gpu_train.py --tiny --steps 2   # the same code path on the CPU with the tiny model
Without CUDA (and without --tiny) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from zimage.training.memory import GIB, gradient_blocks  # noqa: E402
from zimage.training.model_shapes import (  # noqa: E402
    DEFAULT_TARGET_BLOCKS,
    DEFAULT_TARGET_MODULES,
    ZIMAGE_TRANSFORMER_CONFIG,
    Architecture,
    architecture_from_folder,
    lora_targets,
)

H200_BF16_TFLOPS = 989.0
SEQ_MULTIPLE = 32
FULL_MODEL = "zimage-full-random"
COLUMNS = ("case", "s/step", "peak allocated", "peak reserved", "estimate", "measured/estimate",
           "model FLOP/step", "MFU", "loss")  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    side: int
    quantize: str | bool = False
    optimizer: str = "adamw"
    needs_cuda: bool = False


CUDA_CASES = [
    Case("bf16-512", 512),
    Case("bf16-1024", 1024),
    Case("8bit-1024", 1024, quantize="8bit", needs_cuda=True),
    Case("nf4-1024", 1024, quantize="nf4", needs_cuda=True),
    Case("adamw8bit-1024", 1024, optimizer="adamw8bit"),
]
TINY_CASES = [
    Case("bf16-256", 256),
    Case("bf16-512", 512),
    Case("8bit-256", 256, quantize="8bit", needs_cuda=True),
    Case("nf4-256", 256, quantize="nf4", needs_cuda=True),
    Case("adamw8bit-256", 256, optimizer="adamw8bit"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke run of the same path)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (CUDA default 989)")
    p.add_argument("--budget", type=float, default=None, help="seconds; cases that would start later are skipped")
    p.add_argument("--tmp-dir", default=None, help="where the benchmark home goes (the full model is ~12 GB)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _flops(value: float) -> str:
    """FLOP counts in readable units: 1.23 TFLOP, 45.6 MFLOP."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return f"{value:.3g} FLOP"


def _pad(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


def training_flops(arch: Architecture, side: int, caption_tokens: int, rank: int, checkpointing: bool):
    """(model FLOPs, hardware FLOPs) of one LoRA training step per sample (see the module docstring)."""
    t_img, t_cap = _pad((side // 16) ** 2), _pad(caption_tokens)
    stream_tokens = {"img": t_img, "cap": t_cap, "main": t_img + t_cap}
    block_stream = {prefix: stream for prefix, stream in arch.blocks()}
    targets = {lin.name for lin in lora_targets(arch, DEFAULT_TARGET_MODULES, DEFAULT_TARGET_BLOCKS)}
    path = {prefix for prefix, _ in gradient_blocks(arch, targets)}

    def tokens_of(name: str) -> int:
        if "adaLN_modulation" in name or name.startswith("t_embedder"):
            return 1  # once per sample
        if name.startswith("all_x_embedder"):
            return t_img
        if name.startswith("cap_embedder"):
            return t_cap
        if name.startswith("all_final_layer"):
            return stream_tokens["main"]
        return stream_tokens[block_stream[".".join(name.split(".")[:2])]]

    inner = arch.head_dim * int(arch.transformer.get("n_heads", 30))
    forward = grad_path = recompute = 0.0
    for lin in arch.transformer_linears():
        flops = 2.0 * lin.fan_in * lin.fan_out * tokens_of(lin.name)
        lora = 2.0 * rank * (lin.fan_in + lin.fan_out) * tokens_of(lin.name) if lin.name in targets else 0.0
        prefix = ".".join(lin.name.split(".")[:2])
        forward += flops + lora
        if prefix in path or lin.name.endswith("final_layer.2-1.linear"):
            grad_path += flops + 2 * lora  # input gradient + LoRA weight gradients
            recompute += (flops + lora) if prefix in path else 0.0
    for prefix, stream in arch.blocks():
        attn = 4.0 * stream_tokens[stream] ** 2 * inner
        forward += attn
        if prefix in path:
            grad_path += 2 * attn
            recompute += attn
    model = forward + grad_path
    return model, model + (recompute if checkpointing else 0.0)


def build_home(root: Path, tiny: bool, sides: list[int], seed: int):
    """A home with the tiny model, the full-shape random model (CUDA) and one square dataset per side."""
    from PIL import Image

    from zimage.data.folders import DatasetFolder, DatasetInfo
    from zimage.settings import Settings
    from zimage.tiny import TEXT_HIDDEN, TINY_MODEL_NAME, write_tiny_model

    settings = Settings(home=root).ensure()
    write_tiny_model(settings.base_models_dir / TINY_MODEL_NAME, seed=seed)
    if not tiny:
        import torch
        from diffusers import ZImageTransformer2DModel

        full = settings.base_models_dir / FULL_MODEL
        shutil.copytree(settings.base_models_dir / TINY_MODEL_NAME, full)
        shutil.rmtree(full / "transformer")
        start = time.perf_counter()
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # born in bf16 on the GPU: no 25 GB fp32 detour
        try:
            with torch.device("cuda"):
                model = ZImageTransformer2DModel(**{**ZIMAGE_TRANSFORMER_CONFIG, "cap_feat_dim": TEXT_HIDDEN})
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(full / "transformer")
        count = sum(p.numel() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        print(f"full-shape transformer: {count:,} parameters, random, written in {time.perf_counter() - start:.0f} s")
    for side in sides:
        folder = DatasetFolder(settings.datasets_dir / f"square-{side}")
        folder.images_dir.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (side, side), (40 * i, 100, 200 - 40 * i)).save(folder.images_dir / f"{i:03d}.png")
            (folder.images_dir / f"{i:03d}.txt").write_text(f"a plain square of colour number {i}\n")
        folder.write_info(DatasetInfo(name=f"square-{side}", type="style", resolution=side))
    return settings


def case_config(case: Case, model: str, args) -> dict:
    return {
        "model_path": model, "dataset_path": f"square-{case.side}", "resolution": case.side,
        "training_type": "lora", "lora_rank": args.rank, "lora_alpha": args.rank, "batch_size": 1,
        "gradient_accumulation": 1, "gradient_checkpointing": True, "mixed_precision": "bf16",
        "optimizer": case.optimizer, "quantize": case.quantize, "learning_rate": 1e-4, "lr_scheduler": "constant",
        "num_steps": args.warmup + args.steps, "save_every_n_steps": 0, "sample_every_n_steps": 0,
        "output_name": f"bench-{case.name}", "seed": args.seed,
    }  # fmt: skip


def run_case(case: Case, settings, model: str, args, cuda: bool, peak_tflops: float | None) -> dict:
    """Set up the trainer for `case`, time its steps; the figures by column."""
    import torch

    from zimage.config import build_config, validate_config
    from zimage.training.memory import estimate_memory
    from zimage.training.trainer import LoraTrainer

    resolved = validate_config(build_config(case_config(case, model, args)), settings)
    trainer = LoraTrainer(resolved, settings)
    try:
        trainer.setup()
        for _ in range(args.warmup):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = [trainer.train_step()[0] for _ in range(args.steps)]
        if cuda:
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / max(1, args.steps)
        caption_tokens = max(int(t.shape[0]) for t in trainer.features.text.values())
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
        reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
    finally:
        trainer.cleanup()
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    arch = architecture_from_folder(resolved.model_dir)
    est = estimate_memory(resolved.config, arch, caption_tokens=caption_tokens).training_gib
    model_flops, hw_flops = training_flops(arch, case.side, caption_tokens, args.rank, True)
    gib = (lambda v: f"{v:.2f} GiB") if cuda else (lambda v: "n/a (CPU)")
    util = "n/a (no --peak-tflops)"
    if peak_tflops:
        top = peak_tflops * 1e12
        util = f"{100 * model_flops / per_step / top:.1f}% (HFU {100 * hw_flops / per_step / top:.1f}%)"
    return {
        "case": case.name,
        "s/step": f"{per_step:.4f}",
        "peak allocated": gib(peak),
        "peak reserved": gib(reserved),
        "estimate": f"{est:.3f} GiB",
        "measured/estimate": f"{peak / est:.2f}" if cuda and est else "n/a (CPU)",
        "model FLOP/step": f"{_flops(model_flops)} ({caption_tokens} caption tokens)",
        "MFU": util,
        "loss": f"{losses[-1]:.4f}" if losses and math.isfinite(losses[-1]) else str(losses[-1:]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print("gpu_train.py needs CUDA: no CUDA device is visible here (no CUDA: skipped). "
              "Run with --tiny for the CPU smoke run.")  # fmt: skip
        return 0
    import diffusers
    import peft

    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    cases = TINY_CASES if args.tiny else CUDA_CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            print(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in cases)}")
            return 2
        cases = [c for c in cases if c.name in wanted]
    peak_tflops = args.peak_tflops or (None if args.tiny else H200_BF16_TFLOPS)
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"device {name}  torch {torch.__version__}  diffusers {diffusers.__version__}  peft {peft.__version__}")
    if peak_tflops:
        print(f"peak for MFU: {peak_tflops:g} TFLOP/s bf16 dense")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="zimage-gpu-train-", dir=args.tmp_dir))
    failures = 0
    try:
        settings = build_home(root / "home", args.tiny, sorted({c.side for c in cases}), args.seed)
        model = "tiny-zimage" if args.tiny else FULL_MODEL
        print(" | ".join(COLUMNS))
        for case in cases:
            if case.needs_cuda and not cuda:
                print(f"{case.name}: skipped (bitsandbytes quantized loading needs CUDA)")
                continue
            if args.budget is not None and time.monotonic() - started > args.budget:
                print(f"{case.name}: skipped (past the time budget of {args.budget:g} s)")
                continue
            try:
                row = run_case(case, settings, model, args, cuda, peak_tflops)
            except Exception as exc:  # report and go on with the next case
                first = " ".join(line.strip() for line in str(exc).splitlines()[:6])
                print(f"{case.name}: failed: {type(exc).__name__}: {first}", flush=True)
                failures += 1
                continue
            print(" | ".join(f"{k} {row[k]}" for k in COLUMNS), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.0f} s; {failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
