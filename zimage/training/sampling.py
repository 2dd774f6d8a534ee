"""Sample images during training: what the LoRA does so far, as the real pipeline would draw it.

Samples go through diffusers' `ZImagePipeline` with the training transformer itself (no copy), the
model type's steps and CFG (converted to the pipeline's guidance_scale, DESIGN.md section 4), fixed
seeds per prompt and the prompt embeddings from the feature cache (the text encoder is loaded only on
a cache miss and freed again). With the Turbo training adapter merged into the weights, it is applied
at -1.0 on top while sampling, so samples show Turbo + the user's LoRA, which is what the LoRA does
in any other tool. Each image is written as samples/step-NNNNNN-<i>.png plus one samples.jsonl line.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from zimage.data.captions import TRIGGER_PLACEHOLDER
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


class TrainingSampler:
    """Draws the sample images of one run; built by the trainer, used only on the main process."""

    def __init__(self, trainer):
        self.trainer = trainer
        c = trainer.config
        fallback = trainer.training_set.items[0].caption if trainer.training_set.items else ""
        self.prompts = sample_prompts(c, fallback)
        self.steps = int(c.sample_steps or 8)
        self.cfg = float(c.sample_cfg or 1.0)
        self.width = self.height = int(c.sample_resolution or c.resolution)
        self.seed = int(c.sample_seed)
        self._embeddings: dict[str, torch.Tensor] | None = None
        self._vae = None
        self._scheduler_config: dict[str, Any] | None = None
        self._adapter = None  # the training adapter's LoraFile, read once

    # -- inputs, loaded on first use -------------------------------------------------------------------
    def _prompt_embeddings(self) -> dict[str, torch.Tensor]:
        t = self.trainer
        if t.text_lora is not None:  # the text encoder trains too: embed with its current weights
            encoder = t.accelerator.unwrap_model(t.text_encoder)
            was_training = encoder.training
            encoder.eval()
            try:
                with torch.no_grad(), t.accelerator.autocast():
                    embeddings = t.text_lora.encode([*self.prompts, ""], encoder)
            finally:
                encoder.train(was_training)
            return dict(zip([*self.prompts, ""], embeddings, strict=True))
        if self._embeddings is None:
            from zimage.data.training_set import TrainingSet
            from zimage.training.features import prepare_features

            t = self.trainer
            text_dtype = torch.bfloat16 if t.device.type == "cuda" else torch.float32
            empty = TrainingSet(info=t.training_set.info, items=[])
            features = prepare_features(
                empty, [*self.prompts, ""], t.resolved.model_dir, t.cache, t.device, text_dtype, t.cache_stats,
                log=lambda _m: None, beat=t.report.beat, quantize_te=t.config.quantize_te,
            )  # fmt: skip
            self._embeddings = features.text
        return self._embeddings

    def _pipeline(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        t = self.trainer
        model_dir = Path(t.resolved.model_dir)
        if self._vae is None:
            vae_dtype = torch.bfloat16 if t.device.type == "cuda" else torch.float32
            self._vae = zimage_math.load_vae(model_dir, t.device, vae_dtype)
        if self._scheduler_config is None:
            self._scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir / "scheduler"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self._scheduler_config)  # fresh state per call
        pipe = ZImagePipeline(scheduler=scheduler, vae=self._vae, text_encoder=None, tokenizer=None,
                              transformer=transformer)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _adapter_context(self, model):
        adapter_path = self.trainer.resolved.adapter_path
        if adapter_path is None or self.trainer.config.training_type == "finetune":
            return nullcontext()
        from zimage.training import adapter, lora_io

        if self._adapter is None:
            self._adapter = lora_io.read_lora(adapter_path, module_names=[n for n, _ in model.named_modules()])
        return adapter.adapter_reversed(model, self._adapter)

    # -- drawing -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model) -> list[tuple[str, int, Any]]:
        """(prompt, seed, PIL image) for every prompt, drawn with `model` (the unwrapped transformer)."""
        embeddings = self._prompt_embeddings()
        t = self.trainer
        dtype = t.weight_dtype  # what the frozen weights hold; the pipeline casts latents to it too
        negative = embeddings[""].to(t.device, dtype)
        pipe = self._pipeline(model)
        out = []
        was_training = model.training
        model.eval()
        try:
            with self._adapter_context(model), t.accelerator.autocast():
                for i, prompt in enumerate(self.prompts):
                    seed = self.seed + i
                    image = pipe(
                        prompt_embeds=[embeddings[prompt].to(t.device, dtype)],
                        negative_prompt_embeds=[negative],
                        height=self.height,
                        width=self.width,
                        num_inference_steps=self.steps,
                        guidance_scale=zimage_math.guidance_scale(self.cfg),
                        generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="pil",
                    ).images[0]
                    out.append((prompt, seed, image))
        finally:
            model.train(was_training)
        return out

    def sample(self, step: int, reason: str) -> list[dict[str, Any]]:
        """Draw every prompt at `step` and record them in the run folder; returns the samples.jsonl records."""
        t = self.trainer
        model = t.accelerator.unwrap_model(t.transformer)
        images = self.generate(model)
        run = t.report.run
        records = []
        for i, (prompt, seed, image) in enumerate(images):
            rel = f"samples/step-{step:06d}-{i}.png"
            if run is not None:
                target = run.path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, target)  # the app never shows a half-written PNG
            record = {
                "step": step, "prompt": prompt, "seed": seed, "path": rel, "index": i, "reason": reason,
                "steps": self.steps, "cfg": self.cfg, "width": self.width, "height": self.height,
            }  # fmt: skip
            records.append(record)
            if run is not None:
                run.append_sample(record)
        t.report.log(f"Sampled {len(images)} image(s) at step {step} ({reason})")
        return records

    def free(self) -> None:
        self._vae = None
        self._embeddings = None
