"""Run one training job in a run folder: the trainer's `run(job)` for zimage.job.run_job.

This is what `zimage train` (and so the job queue's detached worker) calls. run_job owns the lifecycle
(status from start to end, heartbeat, SIGTERM / SIGINT as a graceful stop, failures with the traceback
tail); this module adds what is the trainer's own: resuming from the newest complete checkpoint, the
final fields (output_path, final_loss) and, for an out-of-memory error, which settings lower memory.
Exit codes: 0 completed or stopped on request, 1 failed. Under torchrun / accelerate launch every process
runs this, but only rank 0 writes the run folder (status, log, metrics, samples, checkpoints, the LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zimage.config import ResolvedConfig
from zimage.job import Job, run_job
from zimage.settings import Settings


def run_training(
    resolved: ResolvedConfig,
    settings: Settings,
    run_dir: Path,
    echo: Callable[[str], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    resume: bool = False,
    checkpoint_name: str | None = None,
) -> int:
    """Train in `run_dir` (config.json already written). Returns the process exit code.

    With `resume`, training continues from the newest complete checkpoint in the run folder; the
    requests the earlier process acted on are in status.json and are not acted on again. `checkpoint_name`
    (step-000040) resumes from that checkpoint instead, with no fallback if it is damaged.
    """
    from zimage.training.checkpoints import find_checkpoint, newest_checkpoint, resumable_checkpoints
    from zimage.training.distributed import is_main_rank, record_rank_error, watch_launcher
    from zimage.training.trainer import LoraTrainer

    run_dir = Path(run_dir)
    main = is_main_rank()
    checkpoint = None
    if resume:
        folder = run_dir / "checkpoints"
        checkpoint = find_checkpoint(folder, checkpoint_name) if checkpoint_name else newest_checkpoint(folder)
    start = checkpoint.step if checkpoint else 0

    def train(job: Job) -> dict:
        job.status(resumed_from_step=start if resume else None, step=start)
        if resume and checkpoint is None:
            for bad, why in resumable_checkpoints(run_dir / "checkpoints")[1]:
                job.log(f"Skipped checkpoint {bad.path}: {why}")
            job.log("Resume asked, but the run folder holds no complete checkpoint: starting at step 0")
        job.progress(step=start, phase="starting")
        trainer = LoraTrainer(resolved, settings, job, run_dir=run_dir, resume_from=checkpoint,
                              resume_fallback=checkpoint_name is None)  # fmt: skip
        job.at_end(trainer.cleanup)  # after the final state is on disk, as before
        job.when_stopped(trainer.request_stop)  # SIGTERM / SIGINT: save, then stop
        trainer.setup()
        result = trainer.train(on_step=on_step)
        return {
            "state": result.state,
            "phase": "done",
            "step": result.steps,
            "output_path": str(result.output_path) if result.output_path else None,
            "final_loss": result.final_loss,
        }

    def describe(exc: BaseException) -> str | None:
        record_rank_error(exc)  # under torchrun: the agent (zimage.jobs.ranks) fails the job with it
        return out_of_memory_message(resolved.config, str(exc)) if _is_out_of_memory(exc) else None

    watch_launcher(run_dir if main else None)  # under torchrun: no rank outlives its agent
    return run_job(run_dir, "train", train, total_steps=resolved.config.num_steps, writer=main, echo=echo,
                   describe_error=describe)  # fmt: skip


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def out_of_memory_message(config, detail: str = "") -> str:
    """The failure text for an out-of-memory error: what ran out, and the settings that lower memory."""
    from zimage.training.memory import memory_savings

    try:
        savings = [(advice, gib) for advice, gib in memory_savings(config) if gib >= 0.05]
    except Exception:  # the advice must never hide the real error
        savings = []
    first = (detail.splitlines() or [""])[0][:300]
    lines = [f"Out of memory ({first})" if first else "Out of memory."]
    if savings:
        lines.append("Settings that lower memory (estimated saving):")
        lines += [f"  - {advice} (about {gib:.1f} GiB)" for advice, gib in savings[:6]]
    else:
        lines.append("Lower resolution, batch_size or lora_rank, or turn on gradient_checkpointing.")
    return "\n".join(lines)
