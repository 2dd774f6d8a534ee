"""The process of a training job over N GPUs: torch's elastic agent with N ranks, and the job's last word.

    python -m zimage.jobs.ranks --nproc-per-node N --run-dir DIR

is what the launcher starts for a `train` job the scheduler gave N > 1 GPUs (CUDA_VISIBLE_DEVICES names
them; its PID is the job's in launch.json). It runs `torch.distributed.run` — the module behind `torchrun` —
in this process, with the arguments of

    torchrun --standalone --nproc_per_node N -m zimage.cli train --run-dir DIR

so the same agent starts the N ranks (rank r on the r-th visible GPU; gloo on a CPU host), and this process
learns how they ended:
- all exited 0: rank 0 wrote the final state (completed, or stopped on request); exit 0.
- a rank failed (an error, or killed): the agent stops the others (SIGTERM, SIGKILL after 30 s) and this
  process writes `failed` with the first failing rank's error — its message and traceback from torchrun's
  error file (zimage.training.distributed.record_rank_error), or the signal that killed it — unless rank 0
  itself was first and already recorded its failure; exit 1.
- SIGTERM / SIGINT to this process: the agent forwards it to every rank (rank 0 saves and ends `stopped`);
  if rank 0 could not write a final state, this process writes `failed` with the reason.
Only rank 0 writes status, metrics, samples and checkpoints while the ranks run. A rank whose agent is
gone (SIGKILL) ends itself (zimage.training.distributed.watch_launcher), so no rank is left behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from zimage.records import Damaged
from zimage.runfolder import ACTIVE_STATES, RunFolder


def agent_arguments(nproc: int, run_dir: Path) -> list[str]:
    """torchrun's command-line arguments for N ranks of `zimage train --run-dir DIR`."""
    return ["--standalone", "--nproc-per-node", str(nproc), "--module", "zimage.cli", "train",
            "--run-dir", str(run_dir)]  # fmt: skip


def failure_text(rank: int, failure, nproc: int) -> tuple[str, str | None]:
    """(error, traceback) of a failed rank from torch's ProcessFailure (error file or exit signal)."""
    data = failure.message
    tb = None
    if isinstance(data, dict):  # written by torch's ErrorHandler: {"message": ..., "extraInfo": {"py_callstack"}}
        tb = (data.get("extraInfo") or {}).get("py_callstack")
        data = data.get("message") or ""
    if failure.exitcode < 0:
        what = f"was killed by {failure.signal_name()} (PID {failure.pid})"
    else:
        what = f"failed (exit code {failure.exitcode}, PID {failure.pid})"
        if data and "pytorch.org/docs" not in str(data):
            what += f": {data}"
    return f"rank {rank} of {nproc} {what}; the other ranks were stopped", tb


def _final(folder: RunFolder) -> str | None:
    rec = folder.status_or_problem()
    return None if isinstance(rec, Damaged) else rec.state


def run_ranks(nproc: int, run_dir: Path) -> int:
    """Run the job's N ranks under torch's elastic agent; the exit code of the job (0 completed / stopped)."""
    folder = RunFolder(run_dir)
    folder.log(f"torchrun: {nproc} ranks of zimage train (torchrun {' '.join(agent_arguments(nproc, run_dir))})")
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        run(parse_args(agent_arguments(nproc, run_dir)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        error, tb = failure_text(rank, failure, nproc)
        if rank == 0 and _final(folder) == "failed":
            folder.log(f"torchrun: {error}")  # rank 0 recorded its own error already: keep it
        else:
            folder.update_status(state="failed", error=error, traceback=tb, ended=time.time())
            folder.log(f"Failed: {error}" + (f"\n{tb}" if tb else ""))
        return 1
    except SignalException as exc:  # SIGTERM / SIGINT: the agent passed it on to every rank and waited
        state = _final(folder)
        if state in ACTIVE_STATES or state is None:
            error = f"stopped by {exc.sigval.name}; rank 0 did not record a final state in time"
            folder.update_status(state="failed", error=error, ended=time.time())
            folder.log(f"Failed: {error}")
            return 1
        return 0 if state in ("stopped", "completed") else 1
    except BaseException as exc:  # the agent itself could not run: say so in the run folder
        error = f"torchrun could not run the {nproc} ranks: {type(exc).__name__}: {exc}"
        folder.update_status(state="failed", error=error, ended=time.time())
        folder.log(f"Failed: {error}")
        return 1
    return 0 if _final(folder) in ("completed", "stopped") else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage.jobs.ranks", description=__doc__.splitlines()[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks (one per GPU)")
    p.add_argument("--run-dir", required=True, help="the queued run's folder (config.json)")
    args = p.parse_args(argv)
    return run_ranks(args.nproc_per_node, Path(args.run_dir).resolve())


if __name__ == "__main__":
    sys.exit(main())
