"""`zimage caption`: the captioning worker, and captioning a dataset straight from the terminal.

zimage caption --run-dir DIR            worker mode (the scheduler runs this): reads DIR/config.json
zimage caption DATASET [options]        caption now, in this process, printing progress
zimage caption --list-models            the captioner catalogue and what is downloaded
zimage caption --download NAME          fetch a captioner (catalogue name or hub id)
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("caption", help="caption a dataset's images (BLIP / Florence-2), or run a captioning job")
    p.add_argument("dataset", nargs="?", help="dataset name (or folder) to caption now")
    p.add_argument("--run-dir", help="worker mode: the run folder whose config.json says what to do")
    p.add_argument("--model", help="captioner: catalogue name, hub id or model folder (default florence-2-base)")
    p.add_argument("--detail", choices=("short", "detailed", "paragraph"), default="short")
    p.add_argument("--mode", choices=("missing", "all"), default="missing",
                   help="missing: only images without a caption (default); all: overwrite every caption")  # fmt: skip
    p.add_argument("--images", nargs="+", metavar="FILE", help="only these image file names")
    p.add_argument("--no-trigger", action="store_true", help="do not start captions with the trigger word")
    p.add_argument("--prompt", default="", help="BLIP only: words every caption starts with")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing model")
    p.add_argument("--list-models", action="store_true", help="list the captioners and exit")
    p.add_argument("--download", metavar="NAME", help="download a captioner and exit")
    p.set_defaults(handler=run)


def _print_progress(status: dict) -> None:
    total, step = status.get("total_steps") or 0, status.get("step") or 0
    current = status.get("current_file") or ""
    line = (
        f"\r[{status.get('state', '?'):<9}] {step}/{total} images  {status.get('error_count', 0)} errors  {current:<40}"
    )
    print(line[:120], end="", file=sys.stderr, flush=True)


def run(args) -> int:
    from zimage.settings import get_settings

    settings = get_settings()
    if args.list_models:
        from zimage.captioning.models import captioner_rows

        for row in captioner_rows(settings):
            print(f"{row['name']:<18} {row['size']:<7} {row['status']:<15} {row['source']}")
        return 0
    if args.download:
        from zimage.captioning.models import download_captioner

        print(f"ready: {download_captioner(args.download, settings, progress=print)}")
        return 0
    from zimage.captioning.worker import run_caption_job

    if args.run_dir and not args.dataset:
        return run_caption_job(args.run_dir)
    if not args.dataset:
        from zimage.errors import UserError

        raise UserError("caption: give a DATASET to caption now, or --run-dir DIR for a queued job")
    return _caption_now(args, settings)


def _caption_now(args, settings) -> int:
    import json
    import tempfile
    from pathlib import Path

    from zimage.captioning.models import DEFAULT_CAPTIONER
    from zimage.captioning.worker import caption_config, run_caption_job
    from zimage.runfolder import RunFolder

    dataset = args.dataset
    if Path(dataset).expanduser().is_dir() and "/" in dataset:
        dataset = str(Path(dataset).expanduser().resolve())
    model = args.model or DEFAULT_CAPTIONER
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    config = caption_config(
        dataset=dataset, model=model, detail=args.detail, mode=args.mode, images=args.images,
        trigger_prefix=not args.no_trigger, prompt=args.prompt, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, device=args.device, download=not args.no_download,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="zimage-caption-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        folder = RunFolder(run_dir)
        folder.write_config(config)
        code = run_caption_job(run_dir, on_progress=_print_progress)
        print(file=sys.stderr)
        status = folder.read_status()
        for err in status.get("errors") or []:
            print(f"error: {err['file']}: {err['error']}", file=sys.stderr)
        summary = {k: status.get(k) for k in ("state", "captioned", "skipped", "error_count", "images_per_s")}
        print(json.dumps(summary))
        if status.get("state") == "failed":
            print(f"error: {status.get('error')}", file=sys.stderr)
    return code
