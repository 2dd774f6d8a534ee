"""The validation loss: one number that says whether a run got better, comparable between runs.

The same images, the same noise and the same noise levels (config `validation_sigmas`) every time: each
image gets its own noise from a generator seeded by (seed, image, sigma), never from the training
generators, so measuring changes no training state (the LoRA of a run with a separate validation
dataset is bit for bit the one of a run without validation). The model runs in eval mode without grad,
one image at a time with every sigma as one batch, on the cached latents and text embeddings.

`validation_images` is a dataset (its own folder) or a held-out fraction of the training set, split off
by a seeded shuffle of the image names before the training batches are drawn (`split_validation`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch

from zimage.data.training_set import TrainingSet
from zimage.training import resume, zimage_math


def sigma_key(sigma: float) -> str:
    """The metrics field of one noise level: val_loss_0.1, val_loss_0.3, ..."""
    return f"val_loss_{sigma:g}"


def split_validation(training_set: TrainingSet, fraction: float, seed: int) -> tuple[TrainingSet, TrainingSet]:
    """(what trains, what validates): `fraction` of the images (at least one, never all), chosen by a
    shuffle of their names seeded by `seed`, so the same config always holds out the same images."""
    items = sorted(training_set.items, key=lambda it: it.name)
    if len(items) < 2:
        from zimage.errors import UserError

        raise UserError(
            f"validation_images = {fraction:g}: the dataset has {len(items)} usable image(s); holding one out "
            "would leave nothing to train on. Use a separate validation dataset instead."
        )
    random.Random(f"{seed}:validation").shuffle(items)
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = {it.name for it in items[:count]}
    train = [it for it in training_set.items if it.name not in held]
    val = [it for it in training_set.items if it.name in held]
    return replace(training_set, items=train), replace(training_set, items=val, skipped=[])


class Validator:
    """Measures the validation loss of a model on fixed inputs.

    `latents`: one (16, h, w) tensor per image; `text`: its caption embedding, same order; `sigmas`: the
    noise levels; `seed`: the run's seed (the noise depends on it and on nothing else).
    """

    def __init__(self, latents: list[torch.Tensor], text: list[torch.Tensor], sigmas: list[float], seed: int):
        self.latents, self.text = latents, text
        self.sigmas = [float(s) for s in sigmas]
        self.seed = seed

    def _noise(self, index: int, shape: torch.Size) -> torch.Tensor:
        """The noise of image `index` for every sigma: its own generator, the same on every call."""
        gen = torch.Generator().manual_seed(resume.step_seed(self.seed, 0, index, "validation"))
        return torch.randn((len(self.sigmas), *shape), generator=gen)

    @torch.no_grad()
    def measure(
        self,
        model,
        on_device: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable[[], Any] = nullcontext,
    ) -> dict[str, float]:
        """{"val_loss": mean over images and sigmas, "val_loss_<sigma>": mean over images} with `model`
        in eval mode (its mode is put back); `on_device` moves a tensor to the model's device and dtype."""
        was_training = model.training
        model.eval()
        per_sigma = torch.zeros(len(self.sigmas), dtype=torch.float64)
        try:
            with autocast():
                for i, (x0, text) in enumerate(zip(self.latents, self.text, strict=True)):
                    noise = on_device(self._noise(i, x0.shape))
                    batch = on_device(x0).expand(len(self.sigmas), *x0.shape)
                    sigmas = torch.tensor(self.sigmas, device=noise.device)
                    pred = zimage_math.predict(
                        model,
                        zimage_math.noisy_latents(batch, noise, sigmas),
                        sigmas,
                        [on_device(text)] * len(self.sigmas),
                    )
                    err = (pred.float() - zimage_math.flow_target(batch, noise).float()) ** 2
                    per_sigma += err.mean(dim=tuple(range(1, err.dim()))).double().cpu()
        finally:
            model.train(was_training)
        per_sigma /= max(1, len(self.latents))
        out = {"val_loss": float(per_sigma.mean())}
        out.update({sigma_key(s): float(v) for s, v in zip(self.sigmas, per_sigma, strict=True)})
        return out


def build_validator(
    resolved, training_set: TrainingSet, features_of, scan, log
) -> tuple[TrainingSet, Validator | None]:
    """(the training set to train on, a Validator or None) for a resolved config.

    `features_of(ts, captions)` gives the Features of a TrainingSet (cache or encoders); `scan(folder)` the
    TrainingSet of a dataset folder. A held-out fraction shrinks the training set before anything else
    sees it."""
    c = resolved.config
    if resolved.validation_fraction is not None:
        training_set, val_set = split_validation(training_set, resolved.validation_fraction, c.seed)
        log(
            f"Validation: {len(val_set.items)} image(s) held out of the training set ({', '.join(i.name for i in val_set.items)})"
        )
    elif resolved.validation_dir is not None:
        val_set = scan(resolved.validation_dir)
        log(f"Validation: {len(val_set.items)} image(s) of {resolved.validation_dir.name}")
    else:
        return training_set, None
    features = features_of(val_set, [it.caption for it in val_set.items])
    text = [features.text[it.caption] for it in val_set.items]
    sigmas = ", ".join(f"{s:g}" for s in c.validation_sigmas)
    log(f"Validation loss at sigma {sigmas} every {c.validation_every_n_steps or c.num_steps} steps")
    return training_set, Validator(features.latents, text, c.validation_sigmas, c.seed)


def due(config, step: int) -> bool:
    """Whether the validation loss is measured after `step`: every N steps, at every checkpoint and at the end."""
    c = config
    return (
        step == c.num_steps
        or (c.validation_every_n_steps > 0 and step % c.validation_every_n_steps == 0)
        or (c.save_every_n_steps > 0 and step % c.save_every_n_steps == 0)
    )
