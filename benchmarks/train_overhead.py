"""How much the trainer adds on top of the bare maths, and what the caches save.

Prints, from one run on this machine (tiny model, demo dataset, CPU unless CUDA is there):
- steps/s of LoraTrainer.train() (caches warm, sampling and saving off, metrics logged every step)
  divided by steps/s of a bare loop doing only forward + backward + optimizer step on the same tensors
  (target >= 0.95);
- time from a new trainer to its first finished step with a cold cache and with a warm one
  (target: warm <= 1/3 of cold).

    .venv/bin/python benchmarks/train_overhead.py [--steps 300] [--block 20] [--resolution 256 512]

Both loops run in one process in alternating blocks of 20 steps, so load from other processes hits
them alike; the first step of each block is left out on both sides (it runs with the other loop's data
in the CPU caches). The ratio printed is the median over block pairs (a trainer block and the bare
block right after it) of bare median ÷ trainer median, with the middle half of the pairs beside it.

Information only: the trainer has no code tuned for this benchmark. Its overhead is a fixed cost per
step (noise and timestep draws, accelerate's accumulate / backward / clip / step bookkeeping, a metrics
line, the control poll), so its share shrinks as steps grow: the tiny model at 256 px (~14 ms steps) is
the hardest case, 512 px (quick_test's resolution, ~28 ms) is shown beside it, and real models take
seconds a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage.config import build_config, validate_config  # noqa: E402
from zimage.demo import write_demo_dataset  # noqa: E402
from zimage.runfolder import RunFolder  # noqa: E402
from zimage.settings import Settings  # noqa: E402
from zimage.tiny import TINY_MODEL_NAME, write_tiny_model  # noqa: E402
from zimage.training import zimage_math  # noqa: E402
from zimage.training.reporting import Reporter  # noqa: E402
from zimage.training.trainer import LoraTrainer  # noqa: E402


def make_config(steps: int, resolution: int, name: str) -> dict:
    return {
        "model_path": TINY_MODEL_NAME,
        "dataset_path": "demo-shapes",
        "resolution": resolution,
        "lora_rank": 8,
        "lora_alpha": 8,
        "learning_rate": 1e-4,
        "num_steps": steps,
        "gradient_accumulation": 1,
        "optimizer": "adamw",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "caption_dropout": 0.0,
        "save_every_n_steps": 0,
        "sample_every_n_steps": 0,
        "log_every_n_steps": 1,
        "output_name": name,
        "overwrite": True,
    }


def time_to_first_step(settings: Settings, resolution: int, name: str) -> tuple[float, LoraTrainer]:
    resolved = validate_config(build_config(make_config(1, resolution, name)), settings)
    t0 = time.perf_counter()
    trainer = LoraTrainer(resolved, settings)
    trainer.setup()
    trainer.train_step()
    return time.perf_counter() - t0, trainer


class BareLoop:
    """The same model, LoRA, optimizer and batches, with every input made before the clock starts."""

    def __init__(self, settings: Settings, steps: int, resolution: int):
        resolved = validate_config(build_config(make_config(steps, resolution, "bare")), settings)
        self.trainer = trainer = LoraTrainer(resolved, settings)
        trainer.setup()  # warm cache: only loads the transformer and builds LoRA + optimizer
        # The optimizer itself, not accelerate's wrapper: the bare loop does nothing but the maths.
        self.model, self.optimizer = trainer.transformer, trainer.optimizer.optimizer
        gen = torch.Generator().manual_seed(0)
        dev = trainer.device
        self.sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # the trainer reads its loss
        self.inputs = []
        for _ in range(steps):
            batch = trainer.sampler.next_batch()
            x0 = torch.stack([trainer.features.latents[i] for i in batch])
            noise = torch.randn(x0.shape, generator=gen)
            sigmas = zimage_math.sample_sigmas(len(batch), "sigmoid", generator=gen)
            text = [trainer.features.text[trainer.training_set.items[i].caption].to(dev) for i in batch]
            x_t = zimage_math.noisy_latents(x0, noise, sigmas)
            self.inputs.append((x_t.to(dev), sigmas.to(dev), text, (x0 - noise).to(dev)))

    def run(self, n: int) -> list[float]:
        """n forward + backward + optimizer steps; seconds from each step's end to the next one's.

        Timed like the trainer (end to end, so freeing a step's autograd graph counts on both sides); the
        first step has no start mark, so it is left out, as the trainer's first step after a switch is.
        """
        ends = []
        for _ in range(n):
            x_t, sigmas, text, target = self.inputs.pop()
            pred = zimage_math.predict(self.model, x_t, sigmas, text)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            del pred, loss
            self.sync()
            ends.append(time.perf_counter())
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]

    def close(self) -> None:
        self.trainer.cleanup()


def interleaved_step_times(settings: Settings, steps: int, block: int, resolution: int, run_dir: Path):
    """Seconds per step of LoraTrainer.train() and of the bare loop, in alternating blocks of `block` steps:
    (trainer blocks, bare blocks), each bare block run right after the trainer block of the same index.

    A trainer step is the time from one step callback to the next (all per-step work included). After
    every `block` trainer steps the callback runs `block` bare steps. Alternating blocks puts both loops
    under the same machine load; the first step of each block is left out on both sides, because it
    runs with the other loop's data in the CPU caches (steady state is what steps/s means in a run).
    """
    resolved = validate_config(build_config(make_config(steps, resolution, "bench")), settings)
    reporter = Reporter(RunFolder(run_dir))  # real run-folder writes, heartbeat thread as `zimage train` runs it
    reporter.start_heartbeat()
    trainer = LoraTrainer(resolved, settings, reporter)
    trainer.setup()
    bare = BareLoop(settings, steps, resolution)
    full_blocks: list[list[float]] = [[]]
    bare_blocks: list[list[float]] = []
    last: list[float] = []  # when the previous callback returned, unless that interval is left out

    def on_step(record) -> None:
        now = time.perf_counter()
        if last:
            full_blocks[-1].append(now - last[0])
        last.clear()
        if record["step"] % block == 0:
            bare_blocks.append(bare.run(block))
            full_blocks.append([])
        else:
            last.append(time.perf_counter())

    trainer.train(on_step=on_step)
    trainer.cleanup()
    reporter.stop_heartbeat()
    bare.close()
    return full_blocks[: len(bare_blocks)], bare_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="trainer steps per resolution (bare: as many)")
    parser.add_argument("--block", type=int, default=20, help="steps of one loop before switching to the other")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    if args.block < 2 or args.steps < 2 * args.block:
        parser.error("--block must be at least 2 and --steps at least twice --block (each block drops its first step)")

    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as tmp:
        settings = Settings(home=Path(tmp)).ensure()
        write_tiny_model(settings.base_models_dir / TINY_MODEL_NAME)
        write_demo_dataset(settings.datasets_dir / "demo-shapes")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        first = args.resolution[0]
        print(f"device {device}, torch threads {torch.get_num_threads()}")

        # Time to first step: the first trainer fills the cache, the second finds everything there. Both
        # start with every library imported and the model files read once, so only the cache differs.
        model_dir = settings.base_models_dir / TINY_MODEL_NAME
        zimage_math.load_vae(model_dir, device)
        zimage_math.load_text_encoder(model_dir, device)
        zimage_math.load_transformer(model_dir)
        cold, trainer = time_to_first_step(settings, first, "cold")
        trainer.cleanup()
        warm, trainer = time_to_first_step(settings, first, "warm")
        stats = trainer.cache_stats
        trainer.cleanup()
        print(
            f"time to first step at {first} px: cold {cold:.2f} s, warm {warm:.2f} s, "
            f"warm/cold {warm / cold:.3f} (target <= 0.333)"
        )
        print(
            f"  warm run encoded latents={stats.latents_encoded} captions={stats.text_encoded}, "
            f"loaded vae={stats.vae_loaded} text_encoder={stats.text_encoder_loaded}"
        )

        # Loop overhead: blocks of trainer steps and bare steps in turn, so load changes hit both alike;
        # compare the medians of all step times (a shared machine's bursts land in the tails, not the median).
        for resolution in args.resolution:
            full_blocks, bare_blocks = interleaved_step_times(
                settings, args.steps, args.block, resolution, Path(tmp) / f"r{resolution}"
            )
            # Each trainer block and the bare block right after it ran under the same load: the median of
            # their ratios is the figure (slow drifts of the machine cancel in each pair).
            pairs = sorted(
                statistics.median(b) / statistics.median(f) for f, b in zip(full_blocks, bare_blocks, strict=True)
            )
            f = statistics.median([t for block in full_blocks for t in block])
            b = statistics.median([t for block in bare_blocks for t in block])
            print(
                f"{resolution} px: trainer {1 / f:.2f} steps/s ({f * 1000:.1f} ms), bare loop {1 / b:.2f} steps/s "
                f"({b * 1000:.1f} ms), ratio {statistics.median(pairs):.3f} (target >= 0.95; median of "
                f"{len(pairs)} block pairs, middle half {pairs[len(pairs) // 4]:.3f}-{pairs[(3 * len(pairs)) // 4]:.3f})"
            )


if __name__ == "__main__":
    main()
