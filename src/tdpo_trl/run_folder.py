"""Where a run writes: its folder (`<logdir>/<run_name>`), its checkpoints, and which checkpoint it resumes from."""

import atexit
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from accelerate.utils import ProjectConfiguration, broadcast_object_list

from .checkpointing import checkpoint_index, list_checkpoints, resolve_checkpoint, run_folder_of


logger = logging.getLogger(__name__)
LOCK_NAME = ".lock"


@dataclass
class RunFolder:
    """`project`: accelerate's project configuration (`project_dir` is the run folder); `checkpoint_dir`: where the
    `checkpoint_<i>` folders go; `checkpoint_limit`: how many are kept; `resume_checkpoint`: the verified checkpoint
    to resume from, or None."""

    project: ProjectConfiguration
    checkpoint_dir: str
    checkpoint_limit: Optional[int]
    resume_checkpoint: Optional[str]
    later_checkpoints: list[str] = field(default_factory=list)  # of the run, newer than the one resumed from
    auto_named: bool = False  # `<exp_name>_<time>`: another run may have taken the name in the same second
    lock: Optional["RunLock"] = None

    def take(self, accelerator):
        """Make the run folder this process group's: the main process locks it (`RunLock`; an auto-named run that
        finds its name taken moves to `<name>_2`, `_3`, ...), every process learns the folder, then the checkpoints
        a resume abandons are set aside. A folder another live process holds is refused on every process."""
        folder, problem = self.project.project_dir, None
        if accelerator.is_main_process:
            try:
                folder = self._lock_folder(folder)
            except RunFolderInUse as err:
                problem = str(err)
        if accelerator.num_processes > 1:
            folder, problem = broadcast_object_list([folder, problem])
        if problem:
            raise RunFolderInUse(problem)
        if folder != self.project.project_dir:
            if self.project.logging_dir == self.project.project_dir:
                self.project.logging_dir = folder
            self.project.project_dir, self.checkpoint_dir = folder, os.path.join(folder, "checkpoints")
        self.set_aside_later_checkpoints(accelerator)

    def release(self):
        """Give the run folder up (the end of training)."""
        if self.lock is not None:
            self.lock.release()

    def _lock_folder(self, folder: str) -> str:
        base, suffix = folder, 1
        while True:
            if self.auto_named and os.path.exists(folder):
                suffix += 1
                folder = f"{base}_{suffix}"
                continue
            try:
                self.lock = RunLock(folder).acquire()
                return folder
            except RunFolderInUse:
                if not self.auto_named:
                    raise

    def set_aside_later_checkpoints(self, accelerator):
        """Resuming a run from one of its earlier checkpoints abandons the newer ones: the main process moves them
        to `<run>/abandoned/<checkpoint>_<time>`, so that a later resume of the run cannot pick the abandoned
        branch. Every process waits for it."""
        if self.later_checkpoints and accelerator.is_main_process:
            abandoned = os.path.join(os.path.dirname(self.checkpoint_dir), "abandoned")
            os.makedirs(abandoned, exist_ok=True)
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            for checkpoint in self.later_checkpoints:
                destination = os.path.join(abandoned, f"{os.path.basename(checkpoint)}_{stamp}")
                os.replace(checkpoint, destination)
                logger.warning(
                    f"resuming from an earlier checkpoint: moved the newer {checkpoint!r} to {destination!r}"
                )
        accelerator.wait_for_everyone()


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resolve_run_folder(config) -> RunFolder:
    """Checkpoints go to `<project_dir>/checkpoints/checkpoint_<i>`, `project_dir` defaulting to
    `<logdir>/<run_name>`; the newest `total_limit` (default `num_checkpoint_limit`) are kept.

    Without a `run_name` the run folder gets a timestamp, so that a second run never collides with the first; a
    resumed run continues in its own folder. Writing into a folder that holds another run's checkpoints is refused.
    """
    kwargs, auto_named = dict(config.project_kwargs), False
    # verified before anything else happens; the trainer loads it once the models exist
    resume_checkpoint = resolve_checkpoint(config.resume_from) if config.resume_from else None
    resumed_run = run_folder_of(resume_checkpoint) if resume_checkpoint else None
    if "project_dir" not in kwargs:
        if resumed_run and not config.run_name:
            kwargs["project_dir"] = resumed_run
        else:
            run_name = config.run_name or f"{config.exp_name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
            kwargs["project_dir"] = os.path.join(config.logdir, run_name)
            auto_named = not config.run_name
    continues_run = resumed_run is not None and _same_folder(kwargs["project_dir"], resumed_run)
    if resumed_run and not continues_run and not config.resume_as_new_run:
        raise ValueError(
            f"`resume_from` {config.resume_from!r} continues the run in {resumed_run!r}, but this run would write "
            f"to {kwargs['project_dir']!r}; drop `run_name` (and `project_kwargs['project_dir']`) to continue the "
            "run in its own folder, or set `resume_as_new_run=True` to start a new run there from that checkpoint"
        )
    checkpoint_limit = kwargs.pop("total_limit", config.num_checkpoint_limit)
    kwargs["automatic_checkpoint_naming"] = False  # checkpoints are named and rotated by the trainer
    checkpoint_dir = os.path.join(kwargs["project_dir"], "checkpoints")
    existing = list_checkpoints(checkpoint_dir)
    if existing and not continues_run:
        what = " of another run; " if config.resume_from else "; set `resume_from` to continue that run, or "
        raise ValueError(
            f"{checkpoint_dir!r} already holds checkpoints ({os.path.basename(existing[-1])} is the latest)"
            f"{what}choose another `run_name` or `logdir`"
        )
    later = []
    if continues_run and resume_checkpoint:
        newer = [c for c in existing if checkpoint_index(c) > checkpoint_index(resume_checkpoint)]
        later = (
            newer if os.path.dirname(os.path.realpath(resume_checkpoint)) == os.path.realpath(checkpoint_dir) else []
        )
    project = ProjectConfiguration(**kwargs)
    return RunFolder(project, checkpoint_dir, checkpoint_limit, resume_checkpoint, later, auto_named)


class RunFolderInUse(ValueError):
    """Another live process writes into this run folder."""


class RunLock:
    """`<run folder>/.lock`, holding `<pid> <host>` of the process whose run writes there. Taken atomically; a lock
    whose process is gone (same host) is taken over; released when training ends or the process exits."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.owner = f"{os.getpid()} {socket.gethostname()}"

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._held_by_a_live_process():
                    raise RunFolderInUse(
                        f"the run folder {os.path.dirname(self.path)!r} is in use by process {self._read()!r} (pid "
                        f"host, in {self.path!r}); wait for that run, choose another `run_name`, or delete the lock "
                        "file if that run is gone"
                    ) from None
                os.remove(self.path)  # left by a process that is gone (or by this one): take it over
                continue
            with os.fdopen(descriptor, "w") as f:
                f.write(self.owner)
            atexit.register(self.release)
            return self
        raise RunFolderInUse(f"could not take the lock {self.path!r}")

    def _read(self) -> str:
        try:
            with open(self.path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _held_by_a_live_process(self) -> bool:
        pid, _, host = self._read().partition(" ")
        if not pid.isdigit() or int(pid) == os.getpid():
            return False
        if host != socket.gethostname():
            return True  # another machine's process: it cannot be checked from here
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self):
        """Remove the lock if this process still holds it."""
        if self._read() == self.owner:
            try:
                os.remove(self.path)
            except OSError:
                pass
