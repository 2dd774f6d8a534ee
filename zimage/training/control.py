"""What happens between training steps: requests from the app and the periodic checkpoints and samples.

Requests arrive through control.json (stop, pause / resume, save now, sample now) or as SIGTERM /
SIGINT (a graceful stop) and are acted on before the next step. With several processes only rank 0
reads control.json; its decision is broadcast, so every rank stops, pauses, saves and samples at the
same step (a rank that went its own way would hang the others in the next collective).
"""

from __future__ import annotations

import time

import torch

from zimage.runfolder import ControlRequests

PAUSE_POLL_SECONDS = 0.5


class TrainingEvents:
    """Between-step duties of one LoraTrainer: control requests, checkpoints, samples."""

    def __init__(self, trainer):
        self.t = trainer
        self.sampler = None  # TrainingSampler, built on first sample
        self.sample_records: list[dict] = []
        self.last_sample_step: int | None = None
        self.last_checkpoint_step: int | None = None
        self.checkpoints: list = []

    # -- requests ------------------------------------------------------------------------------------
    def poll(self) -> ControlRequests:
        """This step's requests, the same on every process."""
        t = self.t
        acc = t.accelerator
        if acc.num_processes == 1:
            req = t.report.poll_control()
            req.stop = req.stop or t.stop_requested
            return req
        flags = torch.zeros(4, dtype=torch.int64, device=t.device)
        if acc.is_main_process:
            req = t.report.poll_control()
            flags = torch.tensor(
                [req.stop or t.stop_requested, req.pause, req.save_now, req.sample_now],
                dtype=torch.int64, device=t.device,
            )  # fmt: skip
        from accelerate.utils import broadcast

        flags = broadcast(flags, from_process=0).tolist()
        return ControlRequests(stop=bool(flags[0]), pause=bool(flags[1]), save_now=bool(flags[2]),
                               sample_now=bool(flags[3]))  # fmt: skip

    def _act(self, req: ControlRequests) -> None:
        if req.save_now:
            self.checkpoint("requested")
        if req.sample_now:
            self.sample("requested")

    def before_step(self) -> bool:
        """Handle requests; False when training must stop now."""
        req = self.poll()
        self._act(req)
        if req.pause and not req.stop:
            req = self._wait_while_paused()
        if req.stop:
            self.t.request_stop("stop requested from the app" if not self.t.stop_requested else "stopping")
            return False
        return True

    def _wait_while_paused(self) -> ControlRequests:
        t = self.t
        t.report.status(state="paused", step=t.step)
        t.report.log(f"Paused at step {t.step}")
        while True:
            time.sleep(PAUSE_POLL_SECONDS)  # (the heartbeat thread keeps status.json fresh meanwhile)
            req = self.poll()
            self._act(req)  # save now / sample now work while paused too
            if req.stop or not req.pause:
                break
        if not req.stop:
            t.report.status(state="running", step=t.step)
            t.report.log(f"Resumed at step {t.step}")
        return req

    # -- periodic duties ------------------------------------------------------------------------------
    def at_start(self) -> None:
        c = self.t.config
        if c.sample_every_n_steps and self.t.step == 0:
            self.sample("baseline")

    def after_step(self) -> None:
        c, step = self.t.config, self.t.step
        if step >= c.num_steps:
            return  # the end is handled by at_end
        if c.save_every_n_steps and step % c.save_every_n_steps == 0:
            self.checkpoint("every_n_steps")
        if c.sample_every_n_steps and step % c.sample_every_n_steps == 0:
            self.sample("every_n_steps")

    def at_end(self, state: str) -> None:
        t, c = self.t, self.t.config
        self.check_replicas()
        if t.step > 0 and (state == "stopped" or (c.save_every_n_steps and state == "completed")):
            self.checkpoint("stop" if state == "stopped" else "end")
        if state == "completed" and c.sample_every_n_steps:
            self.sample("end")

    def check_replicas(self) -> bool:
        """Data parallel: are the trained weights bit-identical on every process? Logged by rank 0."""
        t = self.t
        acc = t.accelerator
        if acc.num_processes == 1:
            return True
        flat = torch.cat([p.detach().reshape(-1) for p in t.params]).double()
        position = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
        signature = torch.stack([flat.sum(), flat.abs().sum(), (flat * position).sum()]).to(t.device)
        signatures = acc.gather(signature.unsqueeze(0)).cpu()
        same = bool((signatures == signatures[0]).all())
        if same:
            t.report.log(f"Data-parallel check: the trained weights are identical on all {acc.num_processes} processes")
        else:
            spread = (signatures - signatures[0]).abs().max().item()
            t.report.log(f"Warning: the trained weights differ between processes (signature spread {spread:.3g})")
        return same

    # -- the two duties ------------------------------------------------------------------------------
    def checkpoint(self, reason: str) -> None:
        t = self.t
        if t.run_dir is None or self.last_checkpoint_step == t.step:
            return
        from zimage.training.resume import save_checkpoint

        t.accelerator.wait_for_everyone()
        if t.accelerator.is_main_process:
            t.report.status(phase="saving checkpoint")
            ckpt = save_checkpoint(t, t.run_dir / "checkpoints", reason)
            self.checkpoints.append(ckpt.path)
            t.report.log(f"Checkpoint at step {t.step} ({reason}): {ckpt.path.name}")
            t.report.status(phase="training")
        self.last_checkpoint_step = t.step
        t.accelerator.wait_for_everyone()

    def sample(self, reason: str) -> None:
        t = self.t
        if self.last_sample_step == t.step and reason != "requested":
            return
        t.accelerator.wait_for_everyone()
        if t.accelerator.is_main_process:
            from zimage.training.sampling import TrainingSampler

            if self.sampler is None:
                self.sampler = TrainingSampler(t)
            t.report.status(phase="sampling")
            self.sample_records += self.sampler.sample(t.step, reason)
            t.report.status(phase="training")
        self.last_sample_step = t.step
        t.accelerator.wait_for_everyone()

    def free(self) -> None:
        if self.sampler is not None:
            self.sampler.free()
            self.sampler = None
