"""Server-side render time of the pages (AppTest).

    .venv/bin/python benchmarks/pages.py --demo [--runs 50] [--repeats 7]
    .venv/bin/python benchmarks/pages.py [--runs 500] [--steps 10000] [--repeats 7] [--all-pages] [--keep DIR]

--demo (issue 15's targets): the demo home (`zimage demo`: tiny model, demo dataset) plus 50 synthetic runs;
every page's first render is timed in a fresh Python process of its own (what the first visitor of a new
server waits for: imports included), then its warm renders in that process. Targets: first <= 1.5 s,
warm <= 0.3 s. Also prints which heavy libraries (torch, diffusers, transformers) a render imported.

Without --demo: the Runs and Compare pages over a registry of 500 runs x 10,000 steps (5 M metric rows).

Builds the synthetic run folders of benchmarks/registry_scale.py (plus sample images on three runs),
ingests them into registry.duckdb, then runs each page script with streamlit.testing's AppTest, in this
process as the server would: one warm-up run (imports, the app's scheduler attaching to the registry),
then `repeats` timed runs. Prints median and slowest, and the ratio to the target of 1 s per page.
Not a test: machines here are shared and noisy, so read the figures, do not assert them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from registry_scale import write_runs  # noqa: E402

from zimage.registry.db import Registry  # noqa: E402
from zimage.registry.ingest import Ingester  # noqa: E402
from zimage.runfolder import RunFolder  # noqa: E402
from zimage.settings import Settings  # noqa: E402

TARGET_S = 1.0
FIRST_TARGET_S, WARM_TARGET_S = 1.5, 0.3  # --demo
PAGES = ["Home.py", "pages/1_Datasets.py", "pages/2_Captioning.py", "pages/3_Train.py", "pages/4_Runs.py",
         "pages/5_Compare.py"]  # fmt: skip
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")


def add_samples(settings: Settings, run_ids: list[str], steps: int) -> None:
    """Sample images (one prompt, two seeds, 8 steps) on a few runs, so Compare draws its grid and Runs its gallery."""
    from PIL import Image

    for k, run_id in enumerate(run_ids):
        rf = RunFolder(settings.runs_dir / run_id)
        (rf.path / "samples").mkdir(exist_ok=True)
        for i in range(1, 9):
            step = steps * i // 8
            for seed in (1, 2):
                rel = f"samples/{step:06d}-{seed}.png"
                Image.new("RGB", (512, 512), (30 * i, 20 * k, 60 * seed)).save(rf.path / rel)
                rf.append_sample({"step": step, "prompt": "a red ball on a table", "seed": seed, "path": rel})


def time_page(page: str, query: dict[str, str], repeats: int) -> tuple[float, float, float]:
    """(warm-up, median, slowest) seconds of the page script run by AppTest."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / page), default_timeout=300)
    for key, value in query.items():
        at.query_params[key] = value
    t = time.perf_counter()
    at.run()
    warm = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].message}")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
    return warm, statistics.median(times), max(times)


def one_page(page: str, repeats: int) -> int:
    """In this (fresh) process: time the page's first render, then its warm ones; print one JSON line."""
    import json

    t = time.perf_counter()
    from streamlit.testing.v1 import AppTest

    imports = time.perf_counter() - t
    at = AppTest.from_file(str(ROOT / page), default_timeout=300)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    problem = at.exception[0].message if at.exception else None
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t)
    from zimage.jobs.scheduler import stop_all

    stop_all()
    heavy = [m for m in HEAVY if m in sys.modules]
    print(json.dumps({"page": page, "streamlit_import": imports, "first": first, "warm": statistics.median(warm),
                      "warm_max": max(warm), "heavy": heavy, "problem": problem}))  # fmt: skip
    return 0


def demo(args) -> int:
    """The demo home + `args.runs` runs; each page in a fresh process."""
    import json
    import subprocess

    from zimage.demo import DEMO_DATASET, write_demo_dataset
    from zimage.tiny import TINY_MODEL_NAME, write_tiny_model

    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zimage-bench-demo-"))
    settings = Settings(home=home).ensure()
    try:
        if not (settings.base_models_dir / TINY_MODEL_NAME).exists():
            write_tiny_model(settings.base_models_dir / TINY_MODEL_NAME)
            write_demo_dataset(settings.datasets_dir / DEMO_DATASET)
            write_runs(settings, args.runs, args.steps)
            names = sorted(p.name for p in settings.runs_dir.iterdir())
            add_samples(settings, names[-3:], args.steps)
        reg = Registry(settings.db_path)
        Ingester(reg, settings).scan()
        reg.close()
        env = dict(os.environ, ZIMAGE_HOME=str(home), ZIMAGE_SCHEDULER_LAUNCH="0")
        print(f"demo home {home}: {args.runs} runs x {args.steps} steps; load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")  # fmt: skip
        for page in PAGES:
            out = subprocess.run([sys.executable, __file__, "--one", page, "--repeats", str(args.repeats)], env=env,
                                 capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(f"{page:22s} failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
                continue
            r = json.loads(lines[-1])
            print(f"{page:22s} first {r['first']:.2f} s (+ {r['streamlit_import']:.2f} s importing streamlit), "
                  f"warm median {r['warm']:.3f} s (slowest {r['warm_max']:.3f}); first / target = "
                  f"{r['first'] / FIRST_TARGET_S:.2f}, warm / target = {r['warm'] / WARM_TARGET_S:.2f}; "
                  f"heavy imports: {', '.join(r['heavy']) or 'none'}" + (f"; ERROR {r['problem']}" if r["problem"] else ""))  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="the demo home with --runs runs (default 50), fresh processes")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one page in this process
    ap.add_argument("--runs", type=int, default=None, help="500; 50 with --demo")
    ap.add_argument("--steps", type=int, default=None, help="10,000; 1,000 with --demo")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--all-pages", action="store_true", help="also time the Home and Train pages")
    ap.add_argument("--keep", help="build in this folder and keep it (reused when it holds runs already)")
    args = ap.parse_args()
    if args.one:
        return one_page(args.one, args.repeats)
    args.runs = args.runs if args.runs is not None else (50 if args.demo else 500)
    args.steps = args.steps if args.steps is not None else (1_000 if args.demo else 10_000)
    if args.demo:
        return demo(args)

    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zimage-bench-pages-"))
    settings = Settings(home=home).ensure()
    os.environ["ZIMAGE_HOME"] = str(home)
    os.environ["ZIMAGE_SCHEDULER_LAUNCH"] = "0"  # index only: nothing here is a real job
    try:
        if not any(settings.runs_dir.iterdir()):
            t = time.perf_counter()
            size = write_runs(settings, args.runs, args.steps)
            names = sorted(p.name for p in settings.runs_dir.iterdir())
            add_samples(settings, names[-3:], args.steps)
            print(
                f"wrote {args.runs} runs x {args.steps} steps ({size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s"
            )
        reg = Registry(settings.db_path)
        t = time.perf_counter()
        Ingester(reg, settings).scan()
        rows = reg.fetch("SELECT count(*) FROM metrics")[0][0]
        order = [r[0] for r in reg.fetch("SELECT run_id FROM runs ORDER BY created DESC, run_id DESC")]
        newest, oldest = order[:3], order[-1]
        reg.close()
        print(f"registry: {rows:,} metric rows, {args.runs} runs (ingest/check {time.perf_counter() - t:.1f} s)")

        cases = [
            ("Runs page, newest run (samples)", "pages/4_Runs.py", {}),
            ("Runs page, ?run=oldest run", "pages/4_Runs.py", {"run": oldest}),
            ("Compare page, 3 runs", "pages/5_Compare.py", {"runs": ",".join(newest)}),
        ]
        if args.all_pages:  # not targets of the issue; for information
            cases += [("Home page", "Home.py", {}), ("Train page", "pages/3_Train.py", {})]
        for title, page, query in cases:
            warm, median, slowest = time_page(page, query, args.repeats)
            print(
                f"{title:30s} median {median:.2f} s, slowest {slowest:.2f} s, first run {warm:.2f} s; "
                f"median / target = {median / TARGET_S:.2f}   (target <= {TARGET_S:.0f} s)"
            )
        from zimage.jobs.scheduler import stop_all

        stop_all()
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
