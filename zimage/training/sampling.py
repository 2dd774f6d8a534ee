"""Sample images during training: what the LoRA does so far, as the real pipeline would draw it.

Samples go through diffusers' `ZImagePipeline` with the training transformer itself (no copy), the
model type's steps and CFG (converted to the pipeline's guidance_scale, DESIGN.md section 4), fixed
seeds per prompt and the prompt embeddings from the feature cache (the text encoder is loaded only on
a cache miss and freed again). With the Turbo training adapter merged into the weights, it is applied
at -1.0 on top while sampling, so samples show Turbo + the user's LoRA, which is what the LoRA does
in any other tool. Each image is written as samples/step-NNNNNN-<i>.png plus one samples.jsonl line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage.data.captions import TRIGGER_PLACEHOLDER
from zimage.fsio import atomic_path
from zimage.training import zimage_math

DEFAULT_PROMPT = "a photo of [trigger]"


def sample_prompts(config, fallback_caption: str = "") -> list[str]:
    """The configured prompts with the trigger word substituted; without any, one built from the trigger.

    `[trigger]` is replaced by the trigger word; a prompt without the placeholder is used as written.
    """
    prompts = [p for p in [*config.sample_prompts, config.sample_prompt] if p and p.strip()]
    if not prompts:
        prompts = [DEFAULT_PROMPT if config.trigger_word else (fallback_caption or "a photo")]
    trigger = (config.trigger_word or "").strip()
    out = []
    for p in prompts:
        text = " ".join(p.replace(TRIGGER_PLACEHOLDER, trigger).split())
        if text not in out:
            out.append(text)
    return out


@dataclass(frozen=True)
class SampleSettings:
    """What every sample of a run is drawn with (prompts, steps, CFG, size, seed)."""

    prompts: list[str]
    steps: int
    cfg: float  # in the usual sense (1.0 = off); the pipeline gets zimage_math.guidance_scale(cfg)
    width: int
    height: int
    seed: int  # prompt i uses seed + i, the same at every step
    negative_prompt: str = ""  # what CFG steers away from (base: the model's default, DESIGN.md section 4)

    @classmethod
    def from_config(cls, config, fallback_caption: str = "") -> SampleSettings:
        side = int(config.sample_resolution or config.resolution)
        return cls(sample_prompts(config, fallback_caption), int(config.sample_steps or 8),
                   float(config.sample_cfg or 1.0), side, side, int(config.sample_seed),
                   " ".join((config.sample_negative_prompt or "").split()))  # fmt: skip


class TrainingSampler:
    """Draws the sample images of one run (main process only).

    `embed(prompts)` gives prompt -> embedding (the negative prompt included); with
    `fixed_embeddings` it is called once and kept (cached text embeddings), otherwise at every sample (a
    text encoder that trains). `adapter_path`: the training adapter merged into the weights, reversed at
    -1.0 while sampling (None: none). `autocast`: the accelerator's autocast context. Images and
    samples.jsonl lines go to `run` (a RunFolder; None: nothing written).
    """

    def __init__(
        self, settings: SampleSettings, model_dir: Path, device: torch.device, dtype: torch.dtype,
        embed: Callable[[list[str]], dict[str, torch.Tensor]], *, fixed_embeddings: bool = True,
        adapter_path: Path | None = None, autocast: Callable[[], Any] = nullcontext, run=None,
        log: Callable[[str], None] = lambda _m: None,
    ):  # fmt: skip
        self.settings = settings
        self.model_dir, self.device, self.dtype = Path(model_dir), device, dtype
        self.embed, self.fixed_embeddings = embed, fixed_embeddings
        self.adapter_path, self.autocast, self.run, self.log = adapter_path, autocast, run, log
        self._embeddings: dict[str, torch.Tensor] | None = None
        self._vae = None
        self._scheduler_config: dict[str, Any] | None = None
        self._adapter = None  # the training adapter's LoraFile, read once

    # -- inputs, loaded on first use -------------------------------------------------------------------
    def _prompt_embeddings(self) -> dict[str, torch.Tensor]:
        if self._embeddings is None or not self.fixed_embeddings:
            self._embeddings = self.embed([*self.settings.prompts, self.settings.negative_prompt])
        return self._embeddings

    def _pipeline(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        if self._vae is None:
            vae_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._vae = zimage_math.load_vae(self.model_dir, self.device, vae_dtype)
        if self._scheduler_config is None:
            self._scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(self.model_dir / "scheduler"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self._scheduler_config)  # fresh state per call
        pipe = ZImagePipeline(scheduler=scheduler, vae=self._vae, text_encoder=None, tokenizer=None,
                              transformer=transformer)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _adapter_context(self, model):
        if self.adapter_path is None:
            return nullcontext()
        from zimage.training import adapter, lora_io

        if self._adapter is None:
            self._adapter = lora_io.read_lora(self.adapter_path, module_names=[n for n, _ in model.named_modules()])
        return adapter.adapter_reversed(model, self._adapter)

    # -- drawing -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model) -> list[tuple[str, int, Any]]:
        """(prompt, seed, PIL image) for every prompt, drawn with `model` (the unwrapped transformer)."""
        embeddings = self._prompt_embeddings()
        s, dtype = self.settings, self.dtype  # what the frozen weights hold; the pipeline casts latents to it too
        negative = embeddings[s.negative_prompt].to(self.device, dtype)
        pipe = self._pipeline(model)
        out = []
        was_training = model.training
        model.eval()
        try:
            with self._adapter_context(model), self.autocast():
                for i, prompt in enumerate(s.prompts):
                    seed = s.seed + i
                    image = pipe(
                        prompt_embeds=[embeddings[prompt].to(self.device, dtype)],
                        negative_prompt_embeds=[negative],
                        height=s.height,
                        width=s.width,
                        num_inference_steps=s.steps,
                        guidance_scale=zimage_math.guidance_scale(s.cfg),
                        generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="pil",
                    ).images[0]
                    out.append((prompt, seed, image))
        finally:
            model.train(was_training)
        return out

    def sample(self, model, step: int, reason: str) -> list[dict[str, Any]]:
        """Draw every prompt with `model` (unwrapped) at `step` and record them; returns the samples.jsonl records."""
        images = self.generate(model)
        s = self.settings
        records = []
        for i, (prompt, seed, image) in enumerate(images):
            rel = f"samples/step-{step:06d}-{i}.png"
            if self.run is not None:
                with atomic_path(self.run.path / rel) as tmp:  # the app never shows a half-written PNG
                    image.save(tmp, format="PNG")
            record = {
                "step": step, "prompt": prompt, "seed": seed, "path": rel, "index": i, "reason": reason,
                "steps": s.steps, "cfg": s.cfg, "width": s.width, "height": s.height,
                **({"negative_prompt": s.negative_prompt} if s.cfg > 1.0 else {}),
            }  # fmt: skip
            records.append(record)
            if self.run is not None:
                self.run.append_sample(record)
        self.log(f"Sampled {len(images)} image(s) at step {step} ({reason})")
        return records

    def free(self) -> None:
        self._vae = None
        self._embeddings = None
