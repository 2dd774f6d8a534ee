"""The LoRA training recipe for Z-Image: one class, `LoraTrainer`, read top to bottom.

Z-Image specifics live in zimage_math, data in zimage.data, file formats in lora_io; this file only
orders them: setup (data, caches, model, optimizer) -> loop -> save.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage.config import ResolvedConfig
from zimage.data.cache import CacheStats, FeatureCache
from zimage.data.training_set import BucketBatchSampler, TrainingSet, scan_dataset
from zimage.errors import UserError
from zimage.settings import Settings
from zimage.training import lora_io, zimage_math
from zimage.training.distributed import make_accelerator
from zimage.training.features import Features, prepare_features
from zimage.training.model_setup import ADAPTER_NAME, target_regex  # noqa: F401 - part of this module's API
from zimage.training.optim import OptimizerStep, build_optimizer
from zimage.training.reporting import Reporter, memory_figures
from zimage.training.timesteps import loss_weights, sample_sigmas

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message says at which step and what to change."""


@dataclass
class TrainResult:
    state: str  # "completed" | "stopped"
    steps: int
    output_path: Path | None
    final_loss: float | None


class LoraTrainer:
    """Train a LoRA on the Z-Image transformer from a validated config.

        trainer = LoraTrainer(validate_config(config, settings), settings, Reporter(run_folder))
        trainer.setup()           # data scan, caches, transformer + LoRA, optimizer, scheduler
        result = trainer.train()  # the loop; saves the LoRA at the end (and on stop)
        trainer.cleanup()

    Supports: flow-matching training exactly as the Z-Image sampler runs (zimage_math); timestep
    sampling sigmoid / logit-normal / uniform / shifted / mode and SD3 loss weightings
    (diffusers.training_utils); a peft LoRA on configurable transformer modules (rank, alpha, dropout);
    the Turbo training adapter merged at +1 before training; AdamW, AdamW8bit, Adafactor, Prodigy;
    every diffusers LR scheduler with warmup; gradient accumulation; grad-norm clipping; bf16 / fp16 /
    fp32; gradient checkpointing; a seed; aspect buckets; caption dropout; cached latents and text
    embeddings (encoders loaded only on a cache miss, freed before training); NaN detection; stop and
    pause requests (control.json, SIGTERM/SIGINT); accelerate on the CPU or one GPU, data-parallel ready
    (per-rank batches and noise, main process encodes and saves); between steps (control.TrainingEvents)
    stop / pause / save-now / sample-now requests, samples at step 0, every N steps and at the end
    (sampling.py; the training adapter reversed at -1 while sampling), atomic checkpoints every N steps
    with the last K kept and exact resume from the newest one (checkpoints.py, resume.py).
    Full fine-tune of every transformer weight (De-Turbo; finetune.py writes a diffusers folder), and
    bitsandbytes 8-bit / NF4 loading of the frozen transformer and text encoder on CUDA (model_setup.py).
    """

    def __init__(
        self,
        resolved: ResolvedConfig,
        settings: Settings,
        reporter: Reporter | None = None,
        run_dir: Path | None = None,
        resume_from=None,
    ):
        """`run_dir` holds checkpoints (default: the reporter's run folder); `resume_from` a Checkpoint."""
        self.resolved = resolved
        self.config = resolved.config
        self.settings = settings
        self.report = reporter or Reporter()
        self.cache_stats = CacheStats()
        self.step = 0  # optimizer steps done
        self.stop_requested = False
        self.losses: list[float] = []
        self.transformer = None
        self.text_lora = self.text_encoder = None  # train_text_encoder: TextEncoderLora, its prepared model
        self.output_path: Path | None = None
        self.run_dir = Path(run_dir) if run_dir else (self.report.run.path if self.report.run is not None else None)
        self.resume_from = resume_from
        from zimage.training.control import TrainingEvents

        self.events = TrainingEvents(self)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        c = self.config
        self.accelerator = make_accelerator(c.mixed_precision, c.gradient_accumulation)
        self.device = self.accelerator.device
        self.weight_dtype = WEIGHT_DTYPES[c.mixed_precision]
        set_seed(c.seed)
        self.report.status(phase="scanning dataset")

        self.training_set = self._scan()
        with self.accelerator.main_process_first():  # one process encodes; the others then find the cache
            self.features = self._features(self.training_set)
        self.report.progress(phase="loading transformer")
        self.transformer, self.params = self._transformer_with_lora()
        if c.train_text_encoder:
            from zimage.training.text_lora import TextEncoderLora

            self.text_lora = TextEncoderLora(self)
            self.params = self.params + self.text_lora.params
            count = sum(p.numel() for p in self.text_lora.params)
            self.report.log(f"Text encoder LoRA: {count:,} trainable parameters (embeddings computed every step)")
        self.optimizer = build_optimizer(c.optimizer, self.params, c.learning_rate, c.weight_decay)
        self.lr_scheduler = self._scheduler(self.optimizer)
        self.transformer, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.transformer, self.optimizer, self.lr_scheduler
        )
        if self.text_lora is not None:
            self.text_encoder = self.accelerator.prepare_model(self.text_lora.encoder)
        self.stepper = OptimizerStep(self.accelerator, self.optimizer, self.lr_scheduler, self.params,
                                     lora=c.training_type == "lora")  # fmt: skip
        # One process, one micro-batch, no GradScaler: a step is just the maths, without accelerate's
        # per-step bookkeeping (its accumulate() context and loss division cost ~0.1 ms on a small step).
        self._lean = self.stepper.single and c.gradient_accumulation == 1
        # Everything random in the loop draws from these, so a resume can restore them exactly.
        self.sampler = BucketBatchSampler(
            [it.bucket for it in self.training_set.items],
            c.batch_size,
            c.seed,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        self.noise_gen = torch.Generator().manual_seed(c.seed + 1000 * self.accelerator.process_index)
        self.caption_rng = random.Random(c.seed + 7 * self.accelerator.process_index)
        if self.resume_from is not None:
            from zimage.training.resume import restore

            restore(self, self.resume_from)
            self.report.log(f"Resumed from {self.resume_from.path.name}: continuing after step {self.step}")

    def _reseed(self) -> None:
        """Noise, timesteps and caption dropout of this step depend only on (seed, rank, step): resumable."""
        from zimage.training.resume import step_seed

        c, rank = self.config, self.accelerator.process_index
        self.noise_gen.manual_seed(step_seed(c.seed, rank, self.step, "noise"))
        if c.caption_dropout > 0:  # the only user of caption_rng
            self.caption_rng.seed(step_seed(c.seed, rank, self.step, "caption"))

    def _scan(self) -> TrainingSet:
        c, r = self.config, self.resolved
        self.cache = FeatureCache(self.settings.cache_dir)
        ts = scan_dataset(r.dataset_dir, c.resolution, c.trigger_word, c.min_image_side or 0, self.cache)
        for s in ts.skipped:
            self.report.log(f"Skipped {s.name}: {s.reason}")
        missing = [it.name for it in ts.items if it.caption_missing]
        if missing:
            self.report.log(
                f"No caption file for {len(missing)} image(s), trained on the trigger word: {', '.join(missing)}"
            )
        if not ts.items:
            raise UserError(f"dataset {r.dataset_dir}: no usable image ({len(ts.skipped)} skipped, see log.txt)")
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ts.bucket_counts().items()))
        self.report.log(
            f"Dataset {r.dataset_dir.name}: {len(ts.items)} images, {len(ts.skipped)} skipped; buckets {buckets}"
        )
        return ts

    def _features(self, ts: TrainingSet) -> Features:
        c = self.config
        captions = [it.caption for it in ts.items] + ([""] if c.caption_dropout > 0 else [])
        if c.train_text_encoder:  # the encoder changes every step: its embeddings cannot be cached
            captions = []
        # bf16 embeddings halve the text encoder's memory on a GPU; the CPU keeps fp32.
        text_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.report.status(phase="caching latents and text")
        features = prepare_features(
            ts, captions, self.resolved.model_dir, self.cache, self.device, text_dtype, self.cache_stats,
            log=self.report.log, beat=self.report.beat, quantize_te=c.quantize_te,
        )  # fmt: skip
        return features

    def _transformer_with_lora(self):
        """The transformer with the user's LoRA (or, for a full fine-tune, all weights) trainable."""
        from zimage.training.model_setup import trainable_transformer

        return trainable_transformer(self)

    def _scheduler(self, optimizer):
        from diffusers.optimization import get_scheduler

        c = self.config
        n = self.accelerator.num_processes  # accelerate steps a prepared scheduler once per process
        return get_scheduler(
            c.lr_scheduler,
            optimizer,
            num_warmup_steps=c.lr_warmup_steps * n,
            num_training_steps=c.num_steps * n,
        )

    # -- the loop ------------------------------------------------------------------------------
    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the training device in the weight dtype (no op at all when it already is)."""
        if tensor.device == self.device and tensor.dtype == self.weight_dtype:
            return tensor
        return tensor.to(self.device, self.weight_dtype)

    def _loss(self, batch: list[int]) -> torch.Tensor:
        c = self.config
        latents = self.features.latents
        x0 = self._on_device(latents[batch[0]][None] if len(batch) == 1 else torch.stack([latents[i] for i in batch]))
        noise = self._on_device(torch.randn(x0.shape, generator=self.noise_gen))
        sigmas = sample_sigmas(
            len(batch), c.timestep_sampling, shift=c.timestep_shift, logit_mean=c.logit_mean,
            logit_std=c.logit_std, generator=self.noise_gen, device=self.device,
        )  # fmt: skip
        captions = [self.training_set.items[i].caption for i in batch]
        if c.caption_dropout > 0:
            captions = ["" if self.caption_rng.random() < c.caption_dropout else cap for cap in captions]
        if self.text_lora is not None:
            text = [t.to(self.weight_dtype) for t in self.text_lora.encode(captions, self.text_encoder)]
        else:
            text = [self._on_device(self.features.text[cap]) for cap in captions]
        x_t = zimage_math.noisy_latents(x0, noise, sigmas)
        # accelerate.prepare() already runs the transformer's forward under autocast for bf16 / fp16.
        pred = zimage_math.predict(self.transformer, x_t, sigmas, text)
        if pred.dtype != torch.float32:
            pred = pred.float()
        target = zimage_math.flow_target(x0, noise)
        if target.dtype != torch.float32:
            target = target.float()
        if c.loss_weighting == "none":  # one fused kernel for the common case
            return torch.nn.functional.mse_loss(pred, target)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        return (per_sample * loss_weights(c.loss_weighting, sigmas)).mean()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over gradient_accumulation micro-batches; returns (loss, grad_norm)."""
        c, acc = self.config, self.accelerator
        self._reseed()
        self.stepper.before_backward()
        if self._lean:
            loss = self._loss(self.sampler.next_batch())
            loss.backward()
            grad_norm = self.stepper.clip(c.max_grad_norm or math.inf)
            self.stepper.step()
            return loss.item(), float(grad_norm)
        total, grad_norm = None, math.nan
        for _ in range(c.gradient_accumulation):
            with acc.accumulate(*[m for m in (self.transformer, self.text_encoder) if m is not None]):
                loss = self._loss(self.sampler.next_batch())
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = self.stepper.clip(c.max_grad_norm or math.inf)
                    self.stepper.step()
            total = loss.detach() if total is None else total + loss.detach()
        mean = (acc.reduce(total, reduction="mean") if acc.num_processes > 1 else total) / c.gradient_accumulation
        return float(mean), float(grad_norm)

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stop_requested:
            self.report.log(f"Stopping: {reason}")
        self.stop_requested = True

    def train(self, on_step=None) -> TrainResult:
        """Run to num_steps (or a stop request), then save the LoRA. `on_step(record)` sees every step."""
        c = self.config
        per_step = c.batch_size * c.gradient_accumulation * self.accelerator.num_processes
        self.report.status(state="running", phase="training", step=self.step, total_steps=c.num_steps)
        self.report.log(f"Training {c.num_steps} steps on {self.device} ({c.mixed_precision}), {per_step} images/step")
        for warning in self.resolved.warnings:
            self.report.log(f"Note: {warning}")
        self.events.at_start()
        started, first_step = time.perf_counter(), self.step
        loss = self.losses[-1] if self.losses else None
        while self.step < c.num_steps:
            if not self.events.before_step():  # stop / pause / save now / sample now
                break
            lr = float(self.lr_scheduler.get_last_lr()[0])  # the rate this step trains with
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            self.step += 1
            step_time = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"The loss became {loss} at step {self.step}: training diverged. Lower learning_rate "
                    f"(now {c.learning_rate:g}), keep max_grad_norm on (now {c.max_grad_norm:g}), or use "
                    "mixed_precision bf16 instead of fp16."
                )
            self.losses.append(loss)
            elapsed = time.perf_counter() - started
            record = {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                "step_time": step_time,
                "samples_per_s": per_step / step_time if step_time > 0 else None,
                "elapsed": elapsed,
                "eta": elapsed / (self.step - first_step) * (c.num_steps - self.step),
            }
            if self.step % c.log_every_n_steps == 0 or self.step == c.num_steps:
                record["mem_allocated"], record["mem_peak"] = memory_figures(self.device.type)
                self.report.add_metrics(record)
            self.report.progress(step=self.step, loss=loss)
            if on_step is not None:
                on_step(record)
            self.events.after_step()  # checkpoints and samples every N steps
        state = "stopped" if self.step < c.num_steps else "completed"
        if state == "stopped":
            self.report.status(state="stopping", step=self.step)
        self.events.at_end(state)  # a checkpoint on stop, the final sample on completion
        output = self.save_output() if self.step > 0 else None
        return TrainResult(state=state, steps=self.step, output_path=output, final_loss=loss)

    # -- output --------------------------------------------------------------------------------
    def lora_modules(self) -> dict[str, lora_io.LoraModule]:
        from peft.utils import get_peft_model_state_dict

        model = self.accelerator.unwrap_model(self.transformer)
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        return lora_io.modules_from_peft(state, self.config.lora_alpha)

    def metadata(self) -> dict[str, str]:
        r = self.resolved
        return lora_io.training_metadata(
            self.config,
            steps=self.step,
            dataset_name=r.dataset_info.name or r.dataset_dir.name,
            dataset_hash=self.training_set.content_hash,
            num_images=len(self.training_set.items),
            adapter_name=r.adapter_path.name if r.adapter_path else "",
        )

    def save_output(self) -> Path | None:
        """The run's result: the LoRA file, or for a full fine-tune the transformer folder (finetune.py)."""
        if self.config.training_type == "finetune":
            from zimage.training.finetune import save_finetuned

            return save_finetuned(self)
        return self.save_lora()

    def save_lora(self) -> Path | None:
        """Write the LoRA file (main process only). A file that appeared since validation is never replaced."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        c = self.config
        path = self.resolved.output_path
        modules, meta, dtype = self.lora_modules(), self.metadata(), lora_io.DTYPES[c.save_dtype]
        try:
            lora_io.save_lora(path, modules, meta, dtype=dtype, overwrite=c.overwrite)
        except FileExistsError:
            n = 2
            while path.with_name(f"{path.stem}-{n}{path.suffix}").exists():
                n += 1
            other = path.with_name(f"{path.stem}-{n}{path.suffix}")
            self.report.log(f"{path.name} appeared while training; saving as {other.name} instead")
            path = lora_io.save_lora(other, modules, meta, dtype=dtype, overwrite=False)
        self.output_path = path
        if self.text_lora is not None:  # the text encoder part goes beside it (see text_lora.py)
            from zimage.training.text_lora import text_encoder_lora_path

            te = self.text_lora.save(self.accelerator.unwrap_model(self.text_encoder), text_encoder_lora_path(path),
                                     meta, dtype, overwrite=True)  # fmt: skip
            self.report.log(f"Saved the text encoder LoRA to {te}")
        self.report.log(f"Saved LoRA ({len(modules)} modules, step {self.step}) to {path}")
        return path

    def save_checkpoint(self, reason: str = "requested") -> None:
        """A resumable checkpoint now (weights + optimizer, scheduler, RNG, data position); see resume.py."""
        self.events.checkpoint(reason)

    def cleanup(self) -> None:
        from diffusers.training_utils import free_memory

        self.events.free()
        if getattr(self, "accelerator", None) is not None:
            self.accelerator.free_memory()
        self.transformer = self.optimizer = self.lr_scheduler = self.stepper = None
        free_memory()
