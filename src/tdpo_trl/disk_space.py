"""A write that failed because the disk filled up, told as such.

torch and safetensors report a full disk in their own words (`basic_ios::clear: iostream error`, a
`SafetensorError`), which never say "disk"; `DiskFullError` does, with the space left and what was kept.
"""

import errno
import shutil
from typing import Optional


LOW_SPACE_BYTES = 64 * 2**20  # a write that failed with less than this free is taken for a full disk


class DiskFullError(OSError):
    """No space left on the device a checkpoint or a save was being written to."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def free_bytes(folder: str) -> Optional[int]:
    """Bytes an unprivileged process may still write on `folder`'s device (None if it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: str) -> bool:
    """Whether `error` (or an error it was raised from) is ENOSPC, or came while `folder`'s device is all but full."""
    cause: Optional[BaseException] = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def disk_full_error(error: BaseException, folder: str, writing: str, kept: str) -> Optional[DiskFullError]:
    """A `DiskFullError` saying what was being written to `folder` and what is `kept`, if `error` came from a full
    disk; else None (the caller re-raises `error`)."""
    if not is_disk_full(error, folder):
        return None
    free = free_bytes(folder)
    space = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    return DiskFullError(
        f"no space left on the device of {folder!r} ({space}) while writing {writing} ({type(error).__name__}: "
        f"{error}); {kept}. Free some space (or choose another folder) and run again"
    )
