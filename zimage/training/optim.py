"""Optimizers by name, and a probe that says whether one really runs on this machine.

The probe builds the optimizer on a small tensor on the target device and takes one step, so a
config naming an optimizer that the installed libraries cannot run here fails validation with the
reason instead of crashing a run (bitsandbytes 0.50 runs 8-bit AdamW on the CPU too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`; raises ValueError for an unknown name."""
    params = list(params)
    if name == "adamw":
        # The fused kernel updates every tensor in one pass: on the tiny CPU model it takes the optimizer step
        # from about 2 ms to a fraction of that, and on CUDA it is torch's fastest AdamW too.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the scheduler drives it), as diffusion trainers use Adafactor.
        return Adafactor(
            params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def optimizer_problem(name: str, device_type: str = "cpu") -> str | None:
    """None when `name` can train on `device_type` here, else a one-line reason."""
    if name not in OPTIMIZERS:
        return f"unknown optimizer; choose one of {', '.join(OPTIMIZERS)}"
    try:
        # 64 x 64 = 4096 elements: large enough that bitsandbytes keeps real 8-bit state.
        param = torch.nn.Parameter(torch.ones(64, 64, device=device_type))
        opt = build_optimizer(name, [param], lr=1e-3)
        param.grad = torch.full_like(param, 0.1)
        opt.step()
        if not torch.isfinite(param).all():
            return "its test step produced non-finite weights"
    except ImportError as exc:
        return f"its library is not installed: {exc}"
    except Exception as exc:  # any failure of a third-party optimizer means "not here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def available_optimizers(device_type: str = "cpu") -> dict[str, str | None]:
    """Every optimizer name with None (usable) or the reason it is not."""
    return {name: optimizer_problem(name, device_type) for name in OPTIMIZERS}


FLAT_GRADIENTS_LIMIT = 1 << 26  # elements (256 MB in fp32): LoRAs; a full fine-tune keeps torch's own gradients


class FlatGradients:
    """The gradients of `params` as views into one buffer, so norm, clipping and zeroing are one op each.

    autograd adds into a gradient that already exists instead of allocating one, so after backward()
    the buffer holds every gradient. For a LoRA's many small tensors this replaces dozens of per-tensor
    ops a step (on the tiny CPU model about a tenth of a millisecond, half the trainer's fixed cost).
    One process only (DDP and sharding manage their own gradient buffers). A parameter that gets no
    gradient in a step sees zeros instead of None, which a LoRA (every adapter in the forward) never has.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        p0 = params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @classmethod
    def fits(cls, params: list[torch.nn.Parameter]) -> bool:
        return (
            bool(params)
            and sum(p.numel() for p in params) <= FLAT_GRADIENTS_LIMIT
            and len({(p.dtype, p.device) for p in params}) == 1
        )

    def attach(self) -> None:
        """Before backward: every gradient is its view (re-attached if anything replaced or dropped one)."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                view.zero_()
                p.grad = view

    def clip_(self, max_norm: float) -> torch.Tensor | float:
        """Scale all gradients to at most max_norm together; returns the norm before scaling."""
        norm = torch.linalg.vector_norm(self.buffer)
        if math.isinf(max_norm):
            return norm
        if self.buffer.device.type == "cpu":  # reading the norm costs nothing here: scale only when needed
            value = float(norm)
            if max_norm / (value + 1e-6) < 1.0:
                self.buffer.mul_(max_norm / (value + 1e-6))
            return value
        self.buffer.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))  # on a GPU without waiting for it
        return norm

    def zero_(self) -> None:
        self.buffer.zero_()


class OptimizerStep:
    """What follows backward(): clip, optimizer step, LR scheduler step, zero the gradients, by the
    cheapest route this setup allows.

    accelerate's optimizer and scheduler wrappers look up installed packages and GradScaler state on
    every step (about 1 ms, a few percent of a small step); without a GradScaler (fp16) they have nothing
    else to do, so the step goes to torch directly. fp16 and sharded runs (FSDP, DeepSpeed) clip through
    accelerate, which unscales or gathers first. One process with a LoRA keeps its gradients in
    FlatGradients.
    """

    def __init__(self, accelerator, optimizer, lr_scheduler, params: list, lora: bool):
        from accelerate.utils import DistributedType

        self.accelerator, self.optimizer, self.lr_scheduler, self.params = accelerator, optimizer, lr_scheduler, params
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.accelerate_clips = accelerator.scaler is not None or sharded
        self.single = accelerator.num_processes == 1 and not self.accelerate_clips  # nothing to sync or unscale
        self.flat = FlatGradients(params) if self.single and lora and FlatGradients.fits(params) else None

    def before_backward(self) -> None:
        if self.flat is not None:
            self.flat.attach()

    def clip(self, max_norm: float) -> torch.Tensor | float:
        """Clip to max_norm and return the norm before clipping (inf: measure only)."""
        if self.accelerate_clips:
            return self.accelerator.clip_grad_norm_(self.params, max_norm)
        if self.flat is not None:
            return self.flat.clip_(max_norm)
        # Plain (and DDP) gradients: torch directly, skipping accelerate's per-call DTensor checks.
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)

    def step(self) -> None:
        """Optimizer and LR scheduler step, once the gradients are complete."""
        if self.accelerator.scaler is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()  # skipped by the wrapper when the scaler skipped the step
            return
        self.optimizer.optimizer.step()
        if self.flat is not None:
            self.flat.zero_()
        else:
            self.optimizer.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accelerator.num_processes):  # a prepared scheduler steps once per process
            self.lr_scheduler.scheduler.step()
