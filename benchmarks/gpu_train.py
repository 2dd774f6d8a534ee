#!/usr/bin/env python
"""LoRA steps on the full-size Z-Image transformer (random weights, no download) on one CUDA GPU.

For each square size (default 512 and 1024) it runs a few LoRA training steps in bf16 with gradient
checkpointing and the flow-matching objective (DESIGN.md section 4), and prints s/step, the peak memory
(torch.cuda.max_memory_allocated), the estimate of zimage.training.memory beside it (its training phase:
the benchmark holds only the transformer) and the model-FLOPs utilisation. Then, unless --quant none,
the same with the frozen transformer loaded through diffusers' BitsAndBytesConfig in 8-bit and NF4.

FLOP count per sample (training_flops): a linear costs 2·fan_in·fan_out per token it sees (main layers
see image + caption tokens, noise_refiner image tokens, context_refiner caption tokens, modulation and
timestep linears one row per sample); attention costs 4·T²·D per block (QKᵀ and PV); a LoRA costs
2·r·(fan_in + fan_out) per token. Model FLOPs per step = forward + backward input gradients along the
gradient path (its linears once more, its attention twice) + LoRA weight gradients (2 x LoRA forward).
MFU = model FLOPs / (s/step x peak); the recompute of gradient checkpointing only counts in HFU.
Peak: --peak-tflops, default 989 TFLOP/s (H200 bf16 dense).

    python benchmarks/gpu_train.py                    # CUDA: bf16 at 512 and 1024, then 8-bit and NF4
    python benchmarks/gpu_train.py --tiny --steps 2   # the same code path on the CPU, tiny model config
Without CUDA (and without --tiny) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from zimage.training.memory import DEFAULT_CAPTION_TOKENS, GIB, estimate_memory, gradient_blocks  # noqa: E402
from zimage.training.model_shapes import (  # noqa: E402
    DEFAULT_TARGET_BLOCKS,
    DEFAULT_TARGET_MODULES,
    TINY,
    ZIMAGE,
    Architecture,
    lora_targets,
)

H200_BF16_TFLOPS = 989.0
SEQ_MULTIPLE = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model config on the CPU (a smoke run of this script)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per size (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    p.add_argument("--sizes", default=None, help="comma-separated square sides (default 512,1024; tiny 64,128)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--caption-tokens", type=int, default=DEFAULT_CAPTION_TOKENS, help="caption length in tokens")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--quant", choices=["all", "none", "8bit", "nf4"], default="all", help="quantized runs (CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (CUDA default 989)")
    p.add_argument("--tmp-dir", default=None, help="where the quantized runs' weights are saved (~12 GB)")
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


def build_transformer(config: dict, device: str, dtype):
    """ZImageTransformer2DModel with random weights, born in `dtype` on `device` (no fp32 detour)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ZImageTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model


def add_lora(model, arch: Architecture, rank: int, checkpointing: bool) -> list:
    """A peft LoRA on attention + feed-forward of the main layers, fp32 trainables, as the trainer does."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.requires_grad_(False)
    names = [lin.name for lin in lora_targets(arch, DEFAULT_TARGET_MODULES, DEFAULT_TARGET_BLOCKS)]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=names))
    cast_training_params(model, dtype=torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(name: str, params: list):
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def make_batches(arch: Architecture, side: int, args, device: str, count: int) -> list:
    """Flow-matching batches: latents (C, 1, H/8, W/8), t = 1 - sigma, target x0 - noise, caption features."""
    import torch

    gen = torch.Generator(device=device).manual_seed(args.seed)
    channels, lat = int(arch.transformer.get("in_channels", 16)), side // 8
    cap_dim = int(arch.transformer.get("cap_feat_dim", 2560))
    out = []
    for _ in range(count):
        x0 = torch.randn(args.batch, channels, 1, lat, lat, generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = ((1 - s) * x0 + s * noise).to(torch.bfloat16)
        caps = [
            torch.randn(args.caption_tokens, cap_dim, generator=gen, device=device).to(torch.bfloat16)
            for _ in range(args.batch)
        ]
        out.append((list(x_t.unbind(0)), 1.0 - sigma, caps, x0 - noise))
    return out


def train_step(model, optimizer, batch, device_type: str):
    import torch

    latents, t, caps, target = batch
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(latents, t, caps, return_dict=False)[0]
    loss = ((torch.stack(out).float() - target) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_size(model, params, arch, side: int, args, device: str, quant: str | None, peak_tflops: float | None) -> bool:
    """Warm up, time `args.steps` steps at side x side, print one line of figures. False on OOM."""
    import torch

    cuda = device == "cuda"
    checkpointing = not args.no_checkpointing
    label = f"{quant or 'bf16':5s} {side}x{side}"
    optimizer = make_optimizer(args.optimizer, params)
    batches = make_batches(arch, side, args, device, args.warmup + args.steps)
    try:
        for batch in batches[: args.warmup]:
            train_step(model, optimizer, batch, device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = [train_step(model, optimizer, batch, device) for batch in batches[args.warmup :]]
        if cuda:
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / max(1, args.steps)
    except torch.cuda.OutOfMemoryError as exc:
        print(f"{label}  out of memory: {str(exc).splitlines()[0]}")
        return False
    finally:
        del optimizer, batches
        for p in params:
            p.grad = None  # an OOM can leave gradients behind
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    cfg = SimpleNamespace(
        training_type="lora", lora_rank=args.rank, batch_size=args.batch, resolution=side,
        gradient_checkpointing=checkpointing, optimizer=args.optimizer, quantize=quant or False,
        mixed_precision="bf16", train_text_encoder=False, sample_every_n_steps=0,
    )  # fmt: skip
    est = estimate_memory(cfg, arch, caption_tokens=args.caption_tokens)
    model_flops, hw_flops = training_flops(arch, side, args.caption_tokens, args.rank, checkpointing)
    model_flops, hw_flops = model_flops * args.batch, hw_flops * args.batch
    achieved = model_flops / per_step
    tokens = f"{est.tokens['image']}+{est.tokens['caption']}"
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GIB
        mem = f"peak {peak:.2f} GiB  estimate {est.training_gib:.2f} GiB (measured/estimate {peak / est.training_gib:.2f})"
    else:
        mem = f"peak n/a (CPU)  estimate {est.training_gib:.3f} GiB"
    if peak_tflops:
        peak = peak_tflops * 1e12
        util = f"MFU {100 * achieved / peak:.1f}%  HFU {100 * hw_flops / per_step / peak:.1f}%"
    else:
        util = "MFU n/a (no accelerator peak; pass --peak-tflops)"
    final = float(losses[-1]) if losses else float("nan")
    print(
        f"{label}  batch {args.batch}  tokens {tokens}  {per_step:.4f} s/step  {mem}  "
        f"model {_flops(model_flops)}/step  achieved {_flops(achieved)}/s  {util}  loss {final:.4f}"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_train.py needs CUDA: no CUDA device is visible here. Run with --tiny for the CPU smoke run.")
        return 0
    import diffusers
    import peft

    device = "cpu" if args.tiny else "cuda"
    arch = TINY if args.tiny else ZIMAGE
    sizes = [int(s) for s in (args.sizes or ("64,128" if args.tiny else "512,1024")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    peak_tflops = args.peak_tflops or (None if args.tiny else H200_BF16_TFLOPS)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"device {name}  torch {torch.__version__}  diffusers {diffusers.__version__}  peft {peft.__version__}")
    if peak_tflops:
        print(f"peak for MFU: {peak_tflops:g} TFLOP/s bf16 dense")
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    model = build_transformer(dict(arch.transformer), device, torch.bfloat16)
    built = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    print(
        f"transformer {arch.name}: {count:,} parameters (closed form {arch.transformer_params():,}), built in {built:.1f} s"
    )

    modes = {"all": ["8bit", "nf4"], "none": []}.get(args.quant, [args.quant])
    tmp = None
    if modes and device == "cuda":
        tmp = Path(tempfile.mkdtemp(prefix="zimage-gpu-train-", dir=args.tmp_dir))
        start = time.perf_counter()
        model.save_pretrained(tmp)  # the quantized runs load these weights through BitsAndBytesConfig
        print(f"saved the bf16 weights for the quantized runs in {time.perf_counter() - start:.1f} s")
    failures = 0
    try:
        params = add_lora(model, arch, args.rank, not args.no_checkpointing)
        _report_resident(params, device)
        for side in sizes:
            failures += not run_size(model, params, arch, side, args, device, None, peak_tflops)
        del model, params
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if modes and device != "cuda":
            print("8-bit / NF4: skipped (bitsandbytes quantized loading needs CUDA)")
        elif modes:
            failures += _quantized_runs(modes, tmp, arch, sizes, args, peak_tflops)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def _report_resident(params: list, device: str) -> None:
    import torch

    lora = sum(p.numel() for p in params)
    line = f"LoRA: {lora:,} trainable parameters"
    if device == "cuda":
        line += f"; resident before the first step {torch.cuda.memory_allocated() / GIB:.2f} GiB"
    print(line)


def _quantized_runs(modes: list[str], folder: Path, arch: Architecture, sizes: list[int], args, peak_tflops) -> int:
    """Load the saved transformer through diffusers' BitsAndBytesConfig and train a LoRA on it."""
    import torch
    from diffusers import BitsAndBytesConfig, ZImageTransformer2DModel

    failures = 0
    for mode in modes:
        if mode == "8bit":
            qc = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        try:
            start = time.perf_counter()
            model = ZImageTransformer2DModel.from_pretrained(folder, quantization_config=qc, torch_dtype=torch.bfloat16)
            print(f"{mode}: loaded through BitsAndBytesConfig in {time.perf_counter() - start:.1f} s")
            params = add_lora(model, arch, args.rank, not args.no_checkpointing)
            _report_resident(params, "cuda")
            for side in sizes:
                failures += not run_size(model, params, arch, side, args, "cuda", mode, peak_tflops)
            del model, params
        except Exception as exc:  # report and go on: the bf16 figures above still stand
            print(f"{mode}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            failures += 1
        gc.collect()
        torch.cuda.empty_cache()
    return failures


if __name__ == "__main__":
    sys.exit(main())
