"""One writer per run directory: `RUN_DIR/.vgg_dist.lock`, created with O_CREAT|O_EXCL and naming its holder.

The holder touches it every HEARTBEAT_SECONDS. It is abandoned, and taken over, when its holder ran on
this machine and is gone, was an earlier start of this same SLURM job (SLURM ends every process of a job
before starting it again), or ran elsewhere and its heartbeat stopped STALE_AFTER_SECONDS ago
(docs/checkpoints.md).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import stat
import threading
import time
from pathlib import Path

from vgg_dist.errors import UsageError

LOCK_NAME = ".vgg_dist.lock"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 300


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot), so a reused process id is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _slurm_start() -> dict:
    """Which start of which SLURM job this process belongs to, if any."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job": job, "slurm_restart": int(restarts)} if job and restarts.isdigit() else {}


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                      "process_start": _process_start(os.getpid()), "token": secrets.token_hex(8),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_slurm_start()}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the run that holds it."""
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except (FileExistsError, IsADirectoryError):  # a directory at the name: _read_holder says so
                holder = self._read_holder()
                if holder is not None and self._alive(holder):
                    raise self._in_use(holder) from None
                self._take_over_abandoned(holder)
                if holder:
                    print(f"took over the lock of {self.path.parent} from a run that ended without releasing it "
                          f"(pid {holder.get('pid')} on {holder.get('host')})", flush=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(self.owner))
                handle.flush()
                os.fsync(handle.fileno())
            self._heartbeat = threading.Thread(target=self._beat, name="vgg_dist-run-lock", daemon=True)
            self._heartbeat.start()
            return
        raise UsageError(f"--output-dir {self.path.parent}: other runs keep taking its lock; choose another directory")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            try:
                holder = self._read_holder()
            except UsageError:
                return  # something else has taken the lock's name; it is not ours to remove
            if holder is not None and holder.get("token") == self.owner["token"]:
                self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the directory went away; nothing to keep fresh

    def _read_holder(self) -> dict | None:
        """Who holds the lock, or None when there is none. Anything but a plain file at the lock's name
        (a FIFO would block a plain open for ever, a directory or link is not ours) is refused."""
        try:
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._not_a_lock("a symbolic link" if error.errno == errno.ELOOP else
                                   f"unreadable ({error.strerror})") from None
        mode = os.fstat(descriptor).st_mode  # before fdopen, which refuses a directory with its own error
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            raise self._not_a_lock("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                                   "not a file")
        with os.fdopen(descriptor, "rb") as handle:
            text = handle.read(1 << 16)
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # written by a process that died mid-write, or not ours: judged by its age alone
        return holder if isinstance(holder, dict) else {}

    def _in_use(self, holder: dict) -> UsageError:
        if isinstance(holder.get("pid"), int):
            host, since = str(holder.get("host"))[:80], str(holder.get("since"))[:40]  # the file could hold anything
            return UsageError(f"--output-dir {self.path.parent} is in use by another run (pid {holder['pid']} on "
                              f"{host}, since {since}); wait for it to end or choose another directory")
        return UsageError(f"--output-dir {self.path.parent}: {self.path} names no run (a run that died while taking "
                          f"it, or not vgg_dist's); it counts as abandoned {STALE_AFTER_SECONDS} s after its last "
                          f"change, or remove it if no run uses {self.path.parent}")

    def _not_a_lock(self, kind: str) -> UsageError:
        return UsageError(f"{self.path} is {kind}, not a vgg_dist lock file; remove it if no run uses "
                          f"{self.path.parent}")

    def _alive(self, holder: dict) -> bool:
        mine = self.owner.get("slurm_job"), self.owner.get("slurm_restart")
        theirs = holder.get("slurm_job"), holder.get("slurm_restart")
        if mine[0] is not None and theirs[0] == mine[0] and isinstance(theirs[1], int) and theirs[1] < mine[1]:
            return False  # an earlier start of this very job, which SLURM ended before starting this one
        same_machine = holder.get("host") == self.owner["host"] and holder.get("boot_id") == self.owner["boot_id"]
        if same_machine and isinstance(holder.get("pid"), int):
            return _process_start(holder["pid"]) == holder.get("process_start")
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < STALE_AFTER_SECONDS

    def _take_over_abandoned(self, judged: dict | None) -> None:
        """Move the abandoned lock aside, then make sure it was the one judged abandoned: if another run
        replaced it in the meantime, put that run's lock back (a hard link fails if the name is taken)."""
        aside = self.path.with_name(f"{LOCK_NAME}.abandoned-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if judged and isinstance(moved, dict) and moved.get("token") != judged.get("token"):
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
