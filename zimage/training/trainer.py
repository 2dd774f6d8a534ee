"""The LoRA training recipe for Z-Image: one class, `LoraTrainer`, read top to bottom.

Z-Image specifics live in zimage_math, data in zimage.data, file formats in lora_io; this file only
orders them: setup (data, caches, model, optimizer) -> loop (with checkpoints and samples) -> save.
Every collaborator gets what it needs (a model, an optimizer, a folder, config values), never the trainer.
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
from zimage.data.captions import drop_caption
from zimage.data.training_set import BucketBatchSampler, TrainingSet
from zimage.optimizers import build_optimizer
from zimage.runfolder import ControlRequests
from zimage.settings import Settings
from zimage.training import resume, trackers, validation, zimage_math
from zimage.training import trainer_parts as parts
from zimage.training.checkpoints import Checkpoint
from zimage.training.control import TrainingControl
from zimage.training.distributed import make_accelerator
from zimage.training.features import Features, prepare_features, scan_training_set
from zimage.training.init_lora import load_weights, with_file_shape
from zimage.training.model_setup import ADAPTER_NAME, target_regex, trainable_transformer  # noqa: F401 - API
from zimage.training.output import save_output
from zimage.training.preservation import build_preservation
from zimage.training.reporting import Reporter, memory_figures
from zimage.training.trainer_parts import TrainingDiverged  # noqa: F401 - API

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@dataclass
class TrainResult:
    state: str  # "completed" | "stopped"
    steps: int
    output_path: Path | None
    final_loss: float | None


class LoraTrainer:
    """Train a LoRA (or every weight) of the Z-Image transformer from a validated config.

        trainer = LoraTrainer(validate_config(config, settings), settings, Reporter(run_folder))
        trainer.setup()           # data scan, caches, transformer + LoRA, optimizer, scheduler, resume
        result = trainer.train()  # the loop; saves the LoRA at the end (and on stop)
        trainer.cleanup()

    Supports: flow-matching training exactly as the Z-Image sampler runs (zimage_math); timestep
    sampling sigmoid / logit-normal / uniform / shifted / mode and SD3 loss weightings; a peft LoRA on
    configurable transformer modules (rank, alpha, dropout); the Turbo training adapter merged at +1
    before training (model_setup.py); AdamW (fused), AdamW8bit, Adafactor, Prodigy; every diffusers LR
    scheduler with warmup; gradient accumulation, grad-norm clipping, bf16 / fp16 / fp32 and data
    parallel through accelerate; gradient checkpointing; a seed; aspect buckets; caption dropout;
    cached latents and text embeddings (encoders loaded only on a cache miss, freed before training);
    NaN detection; stop / pause / save-now / sample-now requests (control.py); samples at step 0, every
    N steps and at the end (sampling.py); atomic checkpoints every N steps with the last K kept and exact
    resume from one (checkpoints.py, resume.py); a LoRA on the text encoder too (text_lora.py); a full
    fine-tune (De-Turbo or base; finetune.py writes a diffusers folder); bitsandbytes 8-bit / NF4 loading
    of the frozen transformer and text encoder on CUDA; a validation loss at fixed sigmas (validation.py);
    differential output preservation (preservation.py); continuing from a LoRA file (init_lora.py).
    """

    def __init__(
        self,
        resolved: ResolvedConfig,
        settings: Settings,
        reporter: Reporter | None = None,
        run_dir: Path | None = None,
        resume_from: Checkpoint | None = None,
        resume_fallback: bool = True,
    ):
        """`run_dir` holds checkpoints (default: the reporter's run folder); `resume_from` a Checkpoint, with
        `resume_fallback` to an older complete one if it proves damaged."""
        self.resolved = resolved
        self.config = resolved.config
        self.settings = settings
        self.report = reporter or Reporter()
        self.cache_stats = CacheStats()
        self.step = 0  # optimizer steps done
        self.stop_requested = False
        self.losses: list[float] = []
        self.val_losses: dict[int, float] = {}  # step -> val_loss (validation.py)
        self.validator = self.preserver = None
        self.accelerator = self.transformer = self.optimizer = self.lr_scheduler = None
        self.text_lora = self.text_encoder = None  # train_text_encoder: TextEncoderLora, its prepared model
        self.image_sampler = None  # sampling.TrainingSampler, built on the first sample
        self.last_checkpoint_step: int | None = None
        self.last_sample_step: int | None = None
        self.output_path: Path | None = None
        self.run_dir = Path(run_dir) if run_dir else (self.report.run.path if self.report.run is not None else None)
        self.resume_from = resume_from
        self.resume_fallback = resume_fallback

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        c, r = self.config, self.resolved
        self.accelerator = acc = make_accelerator(c.mixed_precision, c.gradient_accumulation)
        self.device, self.weight_dtype = acc.device, WEIGHT_DTYPES[c.mixed_precision]
        # bf16 embeddings halve the text encoder's memory on a GPU; the CPU keeps fp32.
        self.text_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        set_seed(c.seed)
        self.report.status(phase="scanning dataset")
        self.cache = FeatureCache(self.settings.cache_dir)
        self.training_set = scan_training_set(r.dataset_dir, c, self.cache, log=self.report.log)
        with acc.main_process_first():  # one process encodes; the others then find the cache
            self.training_set, self.validator = validation.build_validator(r, self.training_set, self._features,
                lambda folder: scan_training_set(folder, c, self.cache, self.report.log), self.report.log)  # fmt: skip
            self.features = self._features(self.training_set)
            self.preserver = build_preservation(c, self.training_set, self._texts, acc.unwrap_model, self.report.log)
        self.config, init = with_file_shape(c, r.init_lora_path, self.report.log)  # init_lora: its rank, alpha...
        c = self.config

        self.report.progress(phase="loading transformer")
        self.transformer, self.params = trainable_transformer(
            c, r.model_dir, r.adapter_path, self.device, self.weight_dtype, log=self.report.log
        )
        if init is not None:
            load_weights(self.transformer, init, ADAPTER_NAME)
        if c.train_text_encoder:
            self.text_lora = parts.text_encoder_lora(c, r.model_dir, self.device, self.weight_dtype, self.report.log)
            self.params = self.params + self.text_lora.params

        self.optimizer = build_optimizer(c.optimizer, self.params, c.learning_rate, c.weight_decay)
        n = acc.num_processes  # accelerate steps a prepared scheduler once per process
        self.lr_scheduler = get_scheduler(c.lr_scheduler, self.optimizer, num_warmup_steps=c.lr_warmup_steps * n,
                                          num_training_steps=c.num_steps * n)  # fmt: skip
        self.transformer, self.optimizer, self.lr_scheduler = acc.prepare(
            self.transformer, self.optimizer, self.lr_scheduler
        )
        if self.text_lora is not None:
            self.text_encoder = acc.prepare_model(self.text_lora.encoder)

        # Everything random in the loop draws from these, so a resume can restore them exactly.
        buckets = [it.bucket for it in self.training_set.items]
        self.sampler = BucketBatchSampler(buckets, c.batch_size, c.seed, rank=acc.process_index,
                                          world_size=acc.num_processes)  # fmt: skip
        self.noise_gen = torch.Generator().manual_seed(c.seed + 1000 * acc.process_index)
        self.caption_rng = random.Random(c.seed + 7 * acc.process_index)
        self.control = TrainingControl(acc, self.report, stopping=lambda: self.stop_requested)
        self.trackers = trackers.attach(self.report, c, self.run_dir)  # report_to: TensorBoard, W&B, MLflow
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)

    def _features(self, ts: TrainingSet, captions: list[str] | None = None) -> Features:
        """Latents of `ts` and embeddings of its captions (or of `captions`), from the cache or encoded."""
        c = self.config
        if captions is None:
            captions = parts.training_captions(c, ts)
            self.report.status(phase="caching latents and text")
        log = self.report.log if ts.items else (lambda _m: None)  # prompts for samples: quietly
        return prepare_features(
            ts, captions, self.resolved.model_dir, self.cache, self.device, self.text_dtype, self.cache_stats,
            log=log, beat=self.report.beat, quantize_te=c.quantize_te,
        )  # fmt: skip

    # -- one step ------------------------------------------------------------------------------
    def _reseed(self) -> None:
        """Noise, timesteps and caption dropout of this step depend only on (seed, rank, step): resumable."""
        c, rank = self.config, self.accelerator.process_index
        self.noise_gen.manual_seed(resume.step_seed(c.seed, rank, self.step, "noise"))
        if c.caption_dropout > 0:  # the only user of caption_rng
            self.caption_rng.seed(resume.step_seed(c.seed, rank, self.step, "caption"))

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the training device in the weight dtype (no op at all when it already is)."""
        if tensor.device == self.device and tensor.dtype == self.weight_dtype:
            return tensor
        return tensor.to(self.device, self.weight_dtype)

    def _loss(self, batch: list[int]) -> torch.Tensor:
        c, latents = self.config, self.features.latents
        x0 = self._on_device(latents[batch[0]][None] if len(batch) == 1 else torch.stack([latents[i] for i in batch]))
        noise = self._on_device(torch.randn(x0.shape, generator=self.noise_gen))
        sigmas = self._sigmas(len(batch))
        captions = [
            drop_caption(self.training_set.items[i].caption, self.caption_rng, c.caption_dropout) for i in batch
        ]
        if self.text_lora is not None:
            text = [t.to(self.weight_dtype) for t in self.text_lora.encode(captions, self.text_encoder)]
        else:
            text = [self._on_device(self.features.text[cap]) for cap in captions]
        # accelerate.prepare() already runs the transformer's forward under autocast for bf16 / fp16.
        x_t = zimage_math.noisy_latents(x0, noise, sigmas)
        if self.preserver is None:
            pred, keep = zimage_math.predict(self.transformer, x_t, sigmas, text), 0.0
        else:  # the class-prompt pass rides in the same forward; its pull towards the base model in the loss
            pred, keep = self.preserver.predict(self.transformer, x_t, sigmas, text, batch, self._on_device)
        return zimage_math.flow_loss(pred, zimage_math.flow_target(x0, noise), sigmas, c.loss_weighting) + keep

    def _sigmas(self, n: int) -> torch.Tensor:
        """`n` noise levels from the step's generator; the shift is the config's, else the model's own."""
        c = self.config
        return zimage_math.sample_sigmas(n, c.timestep_sampling, shift=c.timestep_shift or 1.0, logit_mean=c.logit_mean,
                                         logit_std=c.logit_std, generator=self.noise_gen, device=self.device)  # fmt: skip

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over gradient_accumulation micro-batches; returns (loss, grad_norm).

        As accelerate documents it: inside accumulate() the gradient sync (DDP) and the optimizer,
        scheduler and zero_grad calls take effect on the last micro-batch only; backward() divides the
        loss by the accumulation and scales it for fp16; clip_grad_norm_ unscales first (0: measure only).
        """
        c, acc = self.config, self.accelerator
        self._reseed()
        total, grad_norm = None, math.nan
        for _ in range(c.gradient_accumulation):
            with acc.accumulate(*[m for m in (self.transformer, self.text_encoder) if m is not None]):
                loss = self._loss(self.sampler.next_batch())
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm or math.inf)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total = loss.detach() if total is None else total + loss.detach()
        mean = (acc.reduce(total, reduction="mean") if acc.num_processes > 1 else total) / c.gradient_accumulation
        return float(mean), float(grad_norm)

    # -- the loop ------------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stop_requested:
            self.report.log(f"Stopping: {reason}")
        self.stop_requested = True

    def _act(self, req: ControlRequests) -> None:
        if req.save_now:
            self.save_checkpoint("requested")
        if req.sample_now:
            self.sample("requested")

    def train(self, on_step=None) -> TrainResult:
        """Run to num_steps (or a stop request), then save the LoRA. `on_step(record)` sees every step."""
        c = self.config
        per_step = c.batch_size * c.gradient_accumulation * self.accelerator.num_processes
        self.report.status(state="running", phase="training", step=self.step, total_steps=c.num_steps)
        self.report.log(f"Training {c.num_steps} steps on {self.device} ({c.mixed_precision}), {per_step} images/step")
        for warning in self.resolved.warnings:
            self.report.log(f"Note: {warning}")
        if c.sample_every_n_steps and self.step == 0:
            self.sample("baseline")
        started, first_step = time.perf_counter(), self.step
        loss = self.losses[-1] if self.losses else None
        while self.step < c.num_steps:
            if self.control.between_steps(self.step, self._act).stop:  # stop / pause / save now / sample now
                self.request_stop("stop requested from the app" if not self.stop_requested else "stopping")
                break
            lr = float(self.lr_scheduler.get_last_lr()[0])  # the rate this step trains with
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            self.step += 1
            step_time = time.perf_counter() - t0
            parts.check_finite(loss, self.step, c)
            self.losses.append(loss)
            record = parts.step_record(self.step, loss, lr, grad_norm, step_time, per_step, time.perf_counter() - started,
                                 first_step, c.num_steps)  # fmt: skip
            if self.validator is not None and validation.due(c, self.step):
                record.update(self.validate())
            if self.step % c.log_every_n_steps == 0 or self.step == c.num_steps or "val_loss" in record:
                record["mem_allocated"], record["mem_peak"] = memory_figures(self.device.type)
                self.report.add_metrics(record)
            self.report.progress(step=self.step, loss=loss)
            if on_step is not None:
                on_step(record)
            if self.step < c.num_steps:  # the end is handled below
                if c.save_every_n_steps and self.step % c.save_every_n_steps == 0:
                    self.save_checkpoint("every_n_steps")
                if c.sample_every_n_steps and self.step % c.sample_every_n_steps == 0:
                    self.sample("every_n_steps")

        state = "stopped" if self.step < c.num_steps else "completed"
        if state == "stopped":
            self.report.status(state="stopping", step=self.step)
        self.control.replicas_identical(self.params)
        if self.step > 0 and (state == "stopped" or c.save_every_n_steps):
            self.save_checkpoint("stop" if state == "stopped" else "end")
        if state == "completed" and c.sample_every_n_steps:
            self.sample("end")
        output = self.save_output() if self.step > 0 else None
        return TrainResult(state=state, steps=self.step, output_path=output, final_loss=loss)

    def validate(self) -> dict[str, float]:
        """The validation loss now (validation.py): val_loss and one per sigma; kept for the checkpoint."""
        out = self.validator.measure(self.accelerator.unwrap_model(self.transformer), self._on_device,
                                     self.accelerator.autocast)  # fmt: skip
        self.val_losses[self.step] = out["val_loss"]
        return out

    # -- samples -------------------------------------------------------------------------------
    def _texts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt -> embedding of each of `prompts`, from the cache (or the text encoder once)."""
        return self._features(TrainingSet(info=self.training_set.info, items=[]), prompts).text

    def _prompt_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_lora is not None:  # the text encoder trains too: embed with its current weights
            encoder = self.accelerator.unwrap_model(self.text_encoder)
            return self.text_lora.embed_now(prompts, encoder, self.accelerator.autocast)
        return self._texts(prompts)

    def sample(self, reason: str) -> None:
        """Sample images now with the weights as trained so far (rank 0 draws, the others wait)."""
        if self.last_sample_step == self.step and reason != "requested":
            return
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.image_sampler is None:
                fallback = self.training_set.items[0].caption if self.training_set.items else ""
                self.image_sampler = parts.image_sampler(
                    self.config, self.resolved, self.device, self.weight_dtype, self._prompt_embeddings,
                    fixed=self.text_lora is None, fallback=fallback, autocast=acc.autocast, run=self.report.run,
                    log=self.report.log,
                )  # fmt: skip
            self.report.status(phase="sampling")
            records = self.image_sampler.sample(acc.unwrap_model(self.transformer), self.step, reason)
            self.trackers.log_samples(records, self.run_dir)
            self.report.status(phase="training")
        self.last_sample_step = self.step
        acc.wait_for_everyone()

    # -- checkpoints and output ----------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return parts.run_metadata(self.config, self.resolved, self.training_set, self.step)

    def _unwrapped(self):
        """(transformer, text encoder or None) without accelerate's wrappers."""
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.transformer), (unwrap(self.text_encoder) if self.text_encoder is not None else None)

    def save_checkpoint(self, reason: str = "requested") -> None:
        """A resumable checkpoint now (weights + optimizer, scheduler, RNG, data position); see resume.py."""
        if self.run_dir is None or self.last_checkpoint_step == self.step:
            return
        acc, c = self.accelerator, self.config
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.report.status(phase="saving checkpoint")
            model, encoder = self._unwrapped()
            self.report.flush_metrics()  # the metrics of the steps this checkpoint holds go to disk first
            ckpt = resume.save_checkpoint(
                self.run_dir / "checkpoints", step=self.step, losses=self.losses, training_type=c.training_type,
                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, sampler=self.sampler,
                num_processes=acc.num_processes, reason=reason, keep_last=c.keep_last_n_checkpoints,
                extra={"val_loss": self.val_losses[self.step]} if self.step in self.val_losses else None,
                write=lambda folder: resume.write_weights(folder, model, c.training_type, c.lora_alpha,
                                                          self.metadata(), self.text_lora, encoder),
            )  # fmt: skip
            self.report.log(f"Checkpoint at step {self.step} ({reason}): {ckpt.path.name}")
            self.report.status(phase="training")
        self.last_checkpoint_step = self.step
        acc.wait_for_everyone()

    def load_checkpoint(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt` (every process): weights, optimizer, scheduler, data position, RNG, losses.

        Damaged checkpoints are named in the log; a damaged `ckpt` falls back to the next older complete
        one unless `resume_fallback` is off (the user chose this one). See resume.restore_complete."""
        model, encoder = self._unwrapped()
        used, self.step, self.losses = resume.restore_complete(
            ckpt, fallback=self.resume_fallback, training_type=self.config.training_type, model=model,
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, sampler=self.sampler, text_lora=self.text_lora,
            num_processes=self.accelerator.num_processes, text_encoder=encoder, log=self.report.log,
        )  # fmt: skip
        if used is not ckpt:
            self.report.status(resumed_from_step=used.step, step=used.step)
        self.report.log(f"Resumed from {used.path.name}: continuing after step {self.step}")

    def save_output(self) -> Path | None:
        """The run's result (main process only; output.py): the LoRA file, or a fine-tune's folder."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        model, encoder = self._unwrapped()
        self.output_path = save_output(self.config, model, self.resolved.output_path, self.metadata(), step=self.step,
                                       text_lora=self.text_lora, text_encoder=encoder, log=self.report.log)  # fmt: skip
        return self.output_path

    def cleanup(self) -> None:
        from diffusers.training_utils import free_memory

        if self.image_sampler is not None:
            self.image_sampler.free()
            self.image_sampler = None
        if self.accelerator is not None:
            self.accelerator.free_memory()
        self.transformer = self.optimizer = self.lr_scheduler = self.text_encoder = None
        free_memory()
