"""Differential output preservation: keep what the base model does on prompts without the trigger word.

For each batch, the trigger word in each caption is replaced by the class prompt ("a person"); the same
noisy latents go through the model once with the LoRA disabled (no grad: the target) and once with it
on, and the LoRA is pulled towards the target: MSE x `preservation_weight`, added to the main loss so
both share one backward (the class-prompt pass rides in the main forward as a second half of the batch).
The class captions' text embeddings are cached like the captions. Cost: one no-grad forward and a forward
of twice the batch per step (the step time in metrics shows it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from zimage.errors import UserError
from zimage.training import zimage_math


def class_caption(caption: str, trigger: str, class_prompt: str) -> str:
    """`caption` with every whole-word `trigger` replaced by `class_prompt`, spaces tidied."""
    text = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", class_prompt, caption)
    return " ".join(text.split())


class Preservation:
    """The preservation term of one run. `captions[i]` is training item i's class caption; `text` maps
    each class caption to its embedding; `unwrap()` gives the model whose adapters can be switched."""

    def __init__(self, captions: list[str], text: dict[str, torch.Tensor], weight: float, unwrap: Callable):
        self.captions, self.text, self.weight, self.unwrap = captions, text, float(weight), unwrap

    def predict(self, model, x_t: torch.Tensor, sigmas: torch.Tensor, text: list[torch.Tensor], batch: list[int],
                on_device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the prediction for the captions `text`, weight x MSE(LoRA on the class captions, base model on
        them)) for the noisy latents `x_t`. The captions and the class captions go through the model in one
        forward: one graph for the one backward (under data parallel, DDP expects one forward per backward)."""
        class_text = [on_device(self.text[self.captions[i]]) for i in batch]
        inner = self.unwrap(model)
        with torch.no_grad():
            inner.disable_adapters()  # diffusers' PeftAdapterMixin: the frozen base model alone
            try:
                target = zimage_math.predict(model, x_t, sigmas, class_text)
            finally:
                inner.enable_adapters()
        both = zimage_math.predict(model, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]), [*text, *class_text])
        pred, pred_class = both.chunk(2)
        return pred, self.weight * torch.nn.functional.mse_loss(pred_class.float(), target.float())


def build_preservation(config, training_set, embed: Callable, unwrap: Callable, log) -> Preservation | None:
    """The Preservation of a config (None when preservation_weight is 0). `embed(captions)` gives
    caption -> embedding (from the cache, or encoded once)."""
    c = config
    if not c.preservation_weight:
        return None
    trigger = (c.trigger_word or "").strip()
    if not trigger:
        raise UserError(
            "preservation_weight: needs a trigger word (trigger_word or the dataset's) to replace by "
            f"preservation_prompt {c.preservation_prompt!r}"
        )
    captions = [class_caption(it.caption, trigger, c.preservation_prompt.strip()) for it in training_set.items]
    text = embed(list(dict.fromkeys(captions)))
    log(f"Preservation: weight {c.preservation_weight:g}, {trigger!r} -> {c.preservation_prompt.strip()!r}")
    return Preservation(captions, text, c.preservation_weight, unwrap)
