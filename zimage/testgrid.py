"""Test grid: one prompt rendered with chosen LoRAs / checkpoints at several strengths, as a background job.

The Compare page enqueues a job of kind "testgrid" whose config.json is

    {"model_path": "z-image-turbo", "prompt": "...", "negative_prompt": "", "seed": 42,
     "width": 512, "height": 512, "steps": null, "cfg": null,          # null: the model's sampling defaults
     "strengths": [0.0, 0.5, 1.0],
     "loras": [{"label": "my-lora (final)", "path": "/abs/my-lora.safetensors"}, ...]}

and `zimage testgrid --run-dir DIR` renders it: the pipeline loads once, every LoRA is added with
diffusers' `load_lora_weights` under its own adapter name, and each cell activates one adapter at one
strength (`set_adapters`) with the same seed. Output in the run folder: cells/r<row>-c<col>.png,
samples.jsonl (one line per cell: step = cell number, prompt, seed, path, lora, strength, row, col),
grid.png (rows = LoRAs, columns = strengths, labelled) and status.json (progress, grid_path). The
lifecycle (start, heartbeat, stop / pause requests and SIGTERM, final state, failures) is zimage.job.run_job.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage import catalogue
from zimage.errors import UserError
from zimage.fsio import atomic_path
from zimage.job import Job, run_job
from zimage.settings import Settings

MAX_CELLS = 64
MAX_LORAS = 16
STRENGTH_RANGE = (-4.0, 4.0)
SIDE_RANGE = (64, 2048)
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")
FIELDS = (
    "model_path",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "cfg",
    "strengths",
    "loras",
    "name",
)


class TestGridError(UserError):
    """A test-grid config that cannot run; the message lists every bad field."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("The test grid cannot run:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class LoraChoice:
    label: str
    path: Path


@dataclass
class GridConfig:
    """A checked test-grid config with the model resolved and sampling defaults filled."""

    model_path: str
    model_dir: Path
    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    cfg: float
    strengths: list[float]
    loras: list[LoraChoice]
    negative_prompt: str = ""
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cells(self) -> int:
        return len(self.loras) * len(self.strengths)


def lora_problem(path: Path) -> str | None:
    """None when `path` is a safetensors file holding LoRA weights (only its header is read)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return "must be a .safetensors file (pickles are never loaded)"
    if not path.is_file():
        return "no such file"
    try:
        with safe_open(str(path), framework="np") as fh:
            keys = list(fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        return f"not a readable safetensors file ({exc})"
    if not any(k.endswith(LORA_SUFFIXES) for k in keys):
        return "holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)"
    return None


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return kind(value)


def check_config(raw: dict, settings: Settings) -> GridConfig:
    """Check a test-grid config; raise TestGridError naming every bad field, else return it resolved."""
    if not isinstance(raw, dict):
        raise TestGridError(["config: must be a mapping of settings"])
    problems: list[str] = [f"{k}: unknown setting; known: {', '.join(FIELDS)}" for k in raw if k not in FIELDS]
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("prompt: must not be empty")
    elif len(prompt) > 2000:
        problems.append("prompt: longer than 2000 characters")
    negative = raw.get("negative_prompt") or ""
    if not isinstance(negative, str):
        problems.append("negative_prompt: must be text")
    values: dict[str, Any] = {}
    for name, kind, lo, hi, default in (("seed", int, 0, 2**63 - 1, 42), ("width", int, *SIDE_RANGE, 512),
                                        ("height", int, *SIDE_RANGE, 512), ("steps", int, 1, 200, None),
                                        ("cfg", float, 1.0, 30.0, None)):  # fmt: skip
        value = raw.get(name, default)
        if value is None:
            values[name] = None
            continue
        try:
            value = _number(value, kind)
        except ValueError:
            problems.append(f"{name}: {value!r} must be {'a whole number' if kind is int else 'a number'}")
            continue
        if not lo <= value <= hi:
            problems.append(f"{name}: {value} must be from {lo} to {hi}")
        elif name in ("width", "height") and value % 16:
            problems.append(f"{name}: {value} must be a multiple of 16")
        values[name] = value
    strengths = raw.get("strengths")
    if not isinstance(strengths, list) or not strengths:
        problems.append("strengths: give at least one number, e.g. [0.0, 0.5, 1.0]")
        strengths = []
    else:
        try:
            strengths = [_number(s, float) for s in strengths]
            if any(not STRENGTH_RANGE[0] <= s <= STRENGTH_RANGE[1] or math.isnan(s) for s in strengths):
                problems.append(f"strengths: each must be from {STRENGTH_RANGE[0]:g} to {STRENGTH_RANGE[1]:g}")
        except ValueError:
            problems.append(f"strengths: {strengths!r} must all be numbers")
            strengths = []
    loras: list[LoraChoice] = []
    raw_loras = raw.get("loras")
    if not isinstance(raw_loras, list) or not raw_loras:
        problems.append("loras: choose at least one LoRA or checkpoint")
    elif len(raw_loras) > MAX_LORAS:
        problems.append(f"loras: {len(raw_loras)} chosen; at most {MAX_LORAS}")
    else:
        for i, item in enumerate(raw_loras):
            path = Path(str(item.get("path") if isinstance(item, dict) else item or "")).expanduser()
            label = str(item.get("label") or path.stem) if isinstance(item, dict) else path.stem
            why = lora_problem(path) if str(path) not in ("", ".") else "no path given"
            if why:
                problems.append(f"loras[{i}] ({label}): {path}: {why}")
            elif any(c.path == path for c in loras):
                problems.append(f"loras[{i}] ({label}): {path} is chosen twice")
            else:
                loras.append(LoraChoice(label, path))
    if loras and strengths and len(loras) * len(strengths) > MAX_CELLS:
        problems.append(f"strengths: {len(loras)} LoRAs x {len(strengths)} strengths is more than {MAX_CELLS} images")
    entry, model_dir = None, None
    try:
        entry, model_dir = catalogue.resolve(str(raw.get("model_path") or ""), settings)
    except catalogue.CatalogueError as exc:
        problems.append(f"model_path: {exc}")
    if problems:
        raise TestGridError(problems)
    assert entry is not None and model_dir is not None
    return GridConfig(
        model_path=str(raw["model_path"]), model_dir=model_dir, prompt=prompt.strip(), seed=values["seed"],
        width=values["width"], height=values["height"],
        steps=values["steps"] if values["steps"] is not None else entry.sample_steps,
        cfg=values["cfg"] if values["cfg"] is not None else float(entry.sample_cfg),
        strengths=strengths, loras=loras, negative_prompt=negative, name=str(raw.get("name") or ""),
    )  # fmt: skip


def compose_grid(cells: list[list[Any]], row_labels: list[str], col_labels: list[str]):
    """One image: a header row of column labels, a label column on the left, the cells in between."""
    from PIL import Image, ImageDraw, ImageFont

    cell_w = max(img.width for row in cells for img in row)
    cell_h = max(img.height for row in cells for img in row)
    font = ImageFont.load_default(size=max(12, cell_h // 14))
    label_w, header_h, pad = max(120, cell_w // 2), max(28, cell_h // 8), 4
    grid = Image.new(
        "RGB", (label_w + len(col_labels) * (cell_w + pad), header_h + len(cells) * (cell_h + pad)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels):
        draw.text((label_w + j * (cell_w + pad) + 6, 6), text, fill="black", font=font)
    for i, row in enumerate(cells):
        y = header_h + i * (cell_h + pad)
        draw.multiline_text((6, y + 6), _wrap(row_labels[i], 16), fill="black", font=font)
        for j, img in enumerate(row):
            grid.paste(img, (label_w + j * (cell_w + pad), y))
    return grid


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width) or [""])


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _load_pipeline(cfg: GridConfig, log):
    import torch
    from diffusers import ZImagePipeline

    from zimage.training import lora_io

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = ZImagePipeline.from_pretrained(str(cfg.model_dir), torch_dtype=dtype, use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    # peft warns on every adapter after the first; several adapters side by side are the point here
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    for i, lora in enumerate(cfg.loras):
        try:
            pipe.load_lora_weights(str(lora.path), adapter_name=f"lora{i}")
        except Exception as exc:  # styles diffusers does not convert: our reader knows kohya / ComfyUI names
            log(f"diffusers could not load {lora.path.name} ({exc}); reading it with zimage's LoRA reader")
            lora_io.load_into_transformer(pipe.transformer, lora.path, f"lora{i}")
    return pipe, device


def run_grid(run_dir: Path, settings: Settings) -> int:
    """Render the grid described by run_dir/config.json; returns the exit code (0 completed or stopped,
    1 failed: a bad config ends `failed` with every problem named)."""
    return run_job(run_dir, "testgrid", lambda job: _render(job, settings))


def _render(job: Job, settings: Settings) -> dict:
    """The test-grid kind's work for run_job."""
    import torch

    from zimage.training import zimage_math

    folder = job.run
    cfg = check_config(folder.read_config(), settings)
    job.status(state="running", step=0, total_steps=cfg.cells, phase="loading")
    job.log(f"Test grid: {len(cfg.loras)} LoRA(s) x {len(cfg.strengths)} strength(s) on {cfg.model_path}")
    pipe, device = _load_pipeline(cfg, job.log)
    with torch.inference_mode():  # rendering only: no autograd bookkeeping for any cell
        rows: list[list[Any]] = []
        step = 0
        for i, lora in enumerate(cfg.loras):
            rows.append([])
            for j, strength in enumerate(cfg.strengths):
                if _wait_while_paused(job):
                    job.log(f"Stopped after {step} of {cfg.cells} images")
                    return {"state": "stopped", "step": step}
                pipe.set_adapters([f"lora{i}"], [float(strength)])
                image = pipe(
                    cfg.prompt, negative_prompt=cfg.negative_prompt or None, height=cfg.height, width=cfg.width,
                    num_inference_steps=cfg.steps, guidance_scale=zimage_math.guidance_scale(cfg.cfg),
                    generator=torch.Generator(device).manual_seed(cfg.seed),
                ).images[0]  # fmt: skip
                rel = f"cells/r{i:02d}-c{j:02d}.png"
                _save_png(image, folder.path / rel)
                rows[-1].append(image)
                step += 1
                folder.append_sample({"step": step, "prompt": cfg.prompt, "seed": cfg.seed, "path": rel,
                                      "lora": lora.label, "lora_path": str(lora.path), "strength": strength,
                                      "row": i, "col": j})  # fmt: skip
                job.status(state="running", step=step, phase="rendering")
        grid = compose_grid(rows, [c.label for c in cfg.loras], [f"strength {s:g}" for s in cfg.strengths])
        _save_png(grid, folder.path / "grid.png")
        job.log(f"Grid written: {folder.path / 'grid.png'}")
        return {"state": "completed", "step": step, "phase": "done", "grid_path": "grid.png"}


def _wait_while_paused(job: Job) -> bool:
    """Poll control requests between images: True when a stop was asked; blocks while paused."""
    req = job.poll_control()
    if req.pause and not req.stop:
        job.status(state="paused")
        while req.pause and not req.stop:
            time.sleep(0.5)
            req = job.poll_control()
        if not req.stop:
            job.status(state="running")
    return req.stop
