"""Requests from the app between training steps: stop, pause / resume, save now, sample now.

Requests arrive through the job (control.json, or a SIGTERM / SIGINT turned into a stop) and are acted
on before the next step. With several processes only rank 0 reads them; its decision is broadcast, so
every rank stops, pauses, saves and samples at the same step (a rank that went its own way would hang
the others in the next collective). What a request does is the trainer's business: it passes `act`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from zimage.runfolder import ControlRequests

PAUSE_POLL_SECONDS = 0.5


class TrainingControl:
    """The request side of one run: `accelerator` (who is rank 0, the broadcast), `report` (its job:
    poll_control, status, log) and `stopping()`, true once the trainer was asked to stop otherwise."""

    def __init__(self, accelerator, report, stopping: Callable[[], bool] = lambda: False):
        self.accelerator, self.report, self.stopping = accelerator, report, stopping

    def poll(self) -> ControlRequests:
        """This step's requests, the same on every process."""
        acc = self.accelerator
        if acc.num_processes == 1:
            req = self.report.poll_control()
            req.stop = req.stop or self.stopping()
            return req
        flags = torch.zeros(4, dtype=torch.int64, device=acc.device)
        if acc.is_main_process:
            req = self.report.poll_control()
            flags = torch.tensor([req.stop or self.stopping(), req.pause, req.save_now, req.sample_now],
                                 dtype=torch.int64, device=acc.device)  # fmt: skip
        from accelerate.utils import broadcast

        flags = broadcast(flags, from_process=0).tolist()
        return ControlRequests(stop=bool(flags[0]), pause=bool(flags[1]), save_now=bool(flags[2]),
                               sample_now=bool(flags[3]))  # fmt: skip

    def between_steps(self, step: int, act: Callable[[ControlRequests], None]) -> ControlRequests:
        """Poll, let `act` handle save now / sample now, wait while paused (acting meanwhile too);
        returns the last requests: `.stop` says training must stop now."""
        req = self.poll()
        act(req)
        if not (req.pause and not req.stop):
            return req
        self.report.status(state="paused", step=step)
        self.report.log(f"Paused at step {step}")
        while True:
            time.sleep(PAUSE_POLL_SECONDS)  # (the heartbeat thread keeps status.json fresh meanwhile)
            req = self.poll()
            act(req)  # save now / sample now work while paused too
            if req.stop or not req.pause:
                break
        if not req.stop:
            self.report.status(state="running", step=step)
            self.report.log(f"Resumed at step {step}")
        return req

    def replicas_identical(self, params: list[torch.Tensor]) -> bool:
        """Data parallel: are the trained weights bit-identical on every process? Logged by rank 0."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return True
        flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
        position = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
        signature = torch.stack([flat.sum(), flat.abs().sum(), (flat * position).sum()]).to(acc.device)
        signatures = acc.gather(signature.unsqueeze(0)).cpu()
        same = bool((signatures == signatures[0]).all())
        if same:
            self.report.log(
                f"Data-parallel check: the trained weights are identical on all {acc.num_processes} processes"
            )
        else:
            spread = (signatures - signatures[0]).abs().max().item()
            self.report.log(f"Warning: the trained weights differ between processes (signature spread {spread:.3g})")
        return same
