"""Captioning throughput on the tiny models, and the worker's overhead over calling the model directly.

    .venv/bin/python benchmarks/captioning.py [--images 64] [--rounds 3] [--batch-size 4] [--size 512] [--device auto] [--threads 1]

Builds the tiny random-weight BLIP and Florence-2 folders and a dataset of `--images` PNGs in a temp
folder. For each model it times, on the same images and batches:
  direct  load the model once, then decode (open_rgb) + caption every batch, nothing written;
  worker  the whole background job in-process: config, status/metrics/captions.jsonl per batch, one caption
          file written atomically per image, the model load included (and excluded: its own images/s).
The ratio worker/direct (median of per-round pairs) is the price of progress reporting, stop/pause polling and safe writes.
Not a test: the machines here are shared and noisy, so read the figures, do not assert them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from zimage.captioning.captioners import CaptionOptions, load_captioner  # noqa: E402
from zimage.captioning.tiny import write_tiny_blip, write_tiny_florence2  # noqa: E402
from zimage.captioning.worker import caption_config, run_caption_job  # noqa: E402
from zimage.data.images import open_rgb  # noqa: E402
from zimage.data.manage import create_dataset  # noqa: E402
from zimage.runfolder import RunFolder  # noqa: E402
from zimage.settings import Settings  # noqa: E402


def make_dataset(settings: Settings, count: int, size: int):
    import numpy as np

    folder = create_dataset(settings, "bench", trigger_word="ohwx")
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size + 64 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder.images_dir / f"{i:04d}.png")
    return folder


def time_direct(model_dir: Path, folder, batch: int, options: CaptionOptions, device: str) -> tuple[float, float]:
    """(seconds for decode + caption of every image, seconds of the model load)."""
    t0 = time.perf_counter()
    captioner = load_captioner(model_dir, options, device)
    load = time.perf_counter() - t0
    items = folder.items()
    t0 = time.perf_counter()
    for start in range(0, len(items), batch):
        captioner.caption([open_rgb(i.image) for i in items[start : start + batch]])
    return time.perf_counter() - t0, load


def time_worker(settings: Settings, model_dir: Path, batch: int, options: CaptionOptions, device: str, tag: str):
    run = RunFolder(settings.runs_dir / f"bench-{tag}")
    run.write_config(
        caption_config(dataset="bench", model=str(model_dir), mode="all", batch_size=batch, detail=options.detail,
                       num_beams=options.num_beams, max_new_tokens=options.max_new_tokens, device=device)
    )  # fmt: skip
    t0 = time.perf_counter()
    code = run_caption_job(run.path)
    wall = time.perf_counter() - t0
    status = run.read_status()
    assert code == 0 and status["state"] == "completed", status
    return wall, status["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (decode cost is real)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 suits the tiny models (more threads spin against each other on a busy box)")  # fmt: skip
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="zimage-bench-caption-") as tmp:
        settings = Settings(home=Path(tmp)).ensure()
        os.environ["ZIMAGE_HOME"] = tmp  # the worker reads the home from the environment
        folder = make_dataset(settings, args.images, args.size)
        models = {"blip": Path(tmp) / "tiny-blip", "florence2": Path(tmp) / "tiny-florence2"}
        write_tiny_blip(models["blip"])
        write_tiny_florence2(models["florence2"])
        options = CaptionOptions(detail="short", num_beams=1, max_new_tokens=args.max_new_tokens)
        print(f"{args.images} images of {args.size}px, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
              f"greedy, device {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
        print(f"{'model':<10} {'direct img/s':>12} {'worker img/s':>12} {'worker wall':>11} {'direct+load':>11} "
              f"{'overhead':>9}")  # fmt: skip
        for family, model_dir in models.items():
            # Alternate the two and pair them per round; the box is shared and noisy, so report medians.
            rounds = []
            for r in range(args.rounds):
                d, lo = time_direct(model_dir, folder, args.batch_size, options, args.device)
                w, rate = time_worker(settings, model_dir, args.batch_size, options, args.device, f"{family}{r}")
                rounds.append((d, lo, w, rate))
            direct = statistics.median(d for d, _, _, _ in rounds)
            load = statistics.median(lo for _, lo, _, _ in rounds)
            wall = statistics.median(w for _, _, w, _ in rounds)
            worker_rate = statistics.median(rate for *_, rate in rounds)
            overhead = statistics.median(w / (d + lo) for d, lo, w, _ in rounds)
            n = args.images
            print(
                f"{family:<10} {n / direct:>12.1f} {worker_rate:>12.1f} {wall:>10.2f}s {direct + load:>10.2f}s "
                f"{overhead:>8.2f}x"
            )
        print("overhead = worker wall time (its load, status/metrics/jsonl per batch, atomic caption writes) "
              "/ (model load + decode + caption called directly)")  # fmt: skip


if __name__ == "__main__":
    main()
