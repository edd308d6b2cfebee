"""Turn SIGTERM, SIGINT and SIGUSR1 into a request to checkpoint and stop at the next step boundary."""

from __future__ import annotations

import os
import signal
import subprocess

from vgg_dist.errors import STOP_SIGNALS



class StopRequest:
    """Records the first stop signal; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal_name: str | None = None

    @classmethod
    def installed(cls) -> StopRequest:
        """A StopRequest that receives this process's stop signals from now on."""
        request = cls()
        for number in STOP_SIGNALS:
            signal.signal(number, request._handle)
        return request

    def _handle(self, number, frame) -> None:
        if number == signal.SIGINT and self.signal_name is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job; return what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol requeue {job} failed: {error}"
    if result.returncode != 0:
        return f"scontrol requeue {job} failed: {result.stderr.strip() or result.returncode}"
    return f"requeued SLURM job {job}"
