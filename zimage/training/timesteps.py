"""Which noise levels a training step sees, and how much each one counts.

Sigma runs from 0 (clean) to 1 (pure noise). The densities come from diffusers.training_utils
(logit-normal, mode, uniform); "sigmoid" is the logit-normal with mean 0 and std 1 that the public
Z-Image trainers use, and "shift" is uniform sampling pushed towards noise like the sampler's shift.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

MODE_SCALE = 1.29  # the SD3 paper's value for the "mode" density


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-match scheduler's static shift: shift 1 changes nothing, shift 3 spends more time near noise."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(
    batch_size: int,
    mode: str,
    *,
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`batch_size` sigmas in (0, 1] drawn with `mode` (sigmoid | logit_normal | uniform | shift | mode)."""
    if mode == "sigmoid":
        u = compute_density_for_timestep_sampling("logit_normal", batch_size, 0.0, 1.0, generator=generator)
    elif mode == "logit_normal":
        u = compute_density_for_timestep_sampling(
            "logit_normal", batch_size, logit_mean, logit_std, generator=generator
        )
    elif mode == "mode":
        u = compute_density_for_timestep_sampling("mode", batch_size, mode_scale=MODE_SCALE, generator=generator)
    elif mode in ("uniform", "shift"):
        u = compute_density_for_timestep_sampling("uniform", batch_size, generator=generator)
        if mode == "shift":
            u = shift_sigmas(u, shift)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    # Never exactly 0: a clean input teaches nothing and breaks sigma-based loss weights.
    u = u.clamp(1e-3, 1.0)
    return u if u.device == torch.device(device) else u.to(device)


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (none | sigma_sqrt | cosmap), as in diffusers' SD3 recipe."""
    return compute_loss_weighting_for_sd3("none" if scheme == "none" else scheme, sigmas).float()
