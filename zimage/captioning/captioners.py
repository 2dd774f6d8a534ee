"""Load a BLIP or Florence-2 folder with transformers' own classes and caption PIL images in batches.

Detail levels map to what each model can do: Florence-2 has three caption tasks (<CAPTION>,
<DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>); BLIP writes one sentence, so for it the level only sets
how long that sentence may be. Weights are loaded from safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from zimage.captioning.models import model_family
from zimage.errors import UserError

DETAILS = ("short", "detailed", "paragraph")
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "paragraph": "<MORE_DETAILED_CAPTION>"}
# (min_new_tokens, max_new_tokens) per detail level
_LENGTHS = {
    "blip": {"short": (5, 30), "detailed": (12, 50), "paragraph": (20, 75)},
    "florence2": {"short": (1, 40), "detailed": (1, 120), "paragraph": (1, 256)},
}


@dataclass
class CaptionOptions:
    detail: str = "short"  # short | detailed | paragraph
    max_new_tokens: int | None = None  # None: by detail level
    num_beams: int = 3
    prompt: str = ""  # BLIP only: the caption starts with these words, e.g. "a photograph of"

    def __post_init__(self) -> None:
        if self.detail not in DETAILS:
            raise UserError(f"detail: {self.detail!r} must be one of {', '.join(DETAILS)}")
        if self.max_new_tokens is not None and not 1 <= int(self.max_new_tokens) <= 1024:
            raise UserError(f"max_new_tokens: {self.max_new_tokens} must be between 1 and 1024")
        if not 1 <= int(self.num_beams) <= 16:
            raise UserError(f"num_beams: {self.num_beams} must be between 1 and 16")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Captioner:
    """One loaded model; `caption(images)` returns one string per image, in order."""

    def __init__(self, path: Path | str, options: CaptionOptions | None = None, device: str = "auto"):
        import torch
        from transformers import (
            AutoProcessor,
            BlipForConditionalGeneration,
            Florence2ForConditionalGeneration,
        )

        self.path = Path(path)
        self.options = options or CaptionOptions()
        self.family = model_family(self.path)
        self.device = pick_device(device)
        # Half precision on a GPU halves memory and time; CPUs run float32 (fp16 matmuls are slow there).
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        cls = BlipForConditionalGeneration if self.family == "blip" else Florence2ForConditionalGeneration
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.model = cls.from_pretrained(self.path, dtype=self.dtype, use_safetensors=True).to(self.device).eval()

    def _generate_kwargs(self) -> dict:
        lo, hi = _LENGTHS[self.family][self.options.detail]
        hi = self.options.max_new_tokens or hi
        return {
            "max_new_tokens": hi,
            "min_new_tokens": min(lo, hi),
            "num_beams": self.options.num_beams,
            "do_sample": False,
        }

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        if not images:
            return []
        images = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        if self.family == "florence2":
            text = [FLORENCE_TASKS[self.options.detail]] * len(images)
        else:
            text = [self.options.prompt] * len(images) if self.options.prompt.strip() else None
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generate_kwargs())
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_captioner(path: Path | str, options: CaptionOptions | None = None, device: str = "auto") -> Captioner:
    return Captioner(path, options, device)
