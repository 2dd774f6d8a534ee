"""Optimizers by name, and a probe that says whether one really runs on this machine.

Both the trainer (which builds the optimizer) and config validation (which refuses an optimizer this
machine cannot run) use this module, so it sits beside them, not inside either: zimage.config never
imports zimage.training. Nothing is imported at module level but the names, so the Train page and
validation can read OPTIMIZERS without loading torch.

The probe builds the optimizer on a small tensor on the target device and takes one step, so a config
naming an optimizer that the installed libraries cannot run here fails validation with the reason
instead of crashing a run (bitsandbytes 0.50 runs 8-bit AdamW on the CPU too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`; raises ValueError for an unknown name."""
    import torch

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


LIBRARIES = {"adamw": "torch", "adamw8bit": "bitsandbytes", "adafactor": "transformers", "prodigy": "prodigyopt"}


def library_problem(name: str) -> str | None:
    """None when the library of optimizer `name` is installed (found, not imported: no CUDA initialised)."""
    from importlib.util import find_spec

    if name not in OPTIMIZERS:
        return f"unknown optimizer; choose one of {', '.join(OPTIMIZERS)}"
    return None if find_spec(LIBRARIES[name]) is not None else f"its library is not installed: {LIBRARIES[name]}"


def optimizer_problem(name: str, device_type: str = "cpu") -> str | None:
    """None when `name` can train on `device_type` here, else a one-line reason."""
    if name not in OPTIMIZERS:
        return f"unknown optimizer; choose one of {', '.join(OPTIMIZERS)}"
    try:
        import torch

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
