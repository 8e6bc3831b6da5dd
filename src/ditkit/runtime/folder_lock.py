"""One writer per output folder: a results folder, a latent store, a sample folder.

Two runs writing into one folder overwrite each other's checkpoints and interleave their logs, and both exit
0. So a writer holds an exclusive `flock` on `FOLDER/.ditkit.lock` for as long as it runs, and records its pid
there for the message that refuses a second one. The kernel drops the lock when the holder's process ends,
however it ends (SIGKILL, power loss of a client aside), so a killed run never leaves its folder locked; the
file itself stays, unlocked and harmless. Linux NFS clients turn `flock` into byte-range locks that the server
sees, so two machines sharing a folder exclude each other too.

Opening the lock file is also the first write into the folder, so a read-only destination is named here,
before any work starts, instead of as a traceback at the end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from ditkit.runtime.errors import UserError

LOCK_NAME = ".ditkit.lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # filesystems without flock


class FolderLock:
    """An exclusive lock on `folder` held by this process until `release()` (or the process's end).

    Use as a context manager. `what` names the holder in the refusal (e.g. "ditkit train"), `flag` the option
    that chooses another folder (e.g. "--results-dir").
    """

    def __init__(self, folder: str | os.PathLike, what: str, flag: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # os.open, not open(): "a+" would be refused on a file another process has truncated meanwhile.
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise not_writable(self.folder, err, flag) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _NO_LOCKS:  # e.g. Lustre mounted without -o flock: work on, unguarded, and say so
                print(f"warning: {self.folder}'s filesystem does not support locks ({err.strerror}); a second "
                      "writer into it would not be refused", file=sys.stderr)
                return
            holder = _read_holder(self._fd)
            self.release()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"{self.folder} is in use by another process ({holder or 'pid unknown'}); wait for it to end, "
                f"or choose another {flag}"
            ) from None
        host = socket.gethostname()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{what}, pid {os.getpid()} on {host}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 400, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def not_writable(folder: Path, err: OSError, flag: str) -> UserError:
    """The one-line refusal of a destination that cannot be written."""
    reason = err.strerror or str(err)
    if err.errno == errno.EEXIST or (folder.exists() and not folder.is_dir()):
        reason = "it exists and is not a folder"
    return UserError(f"cannot write into {folder}: {reason}; choose another {flag}")


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Make `folder` if needed and prove it takes a new file, or refuse it with one line naming `flag`."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".ditkit-probe-"):
            pass
    except OSError as err:
        raise not_writable(folder, err, flag) from None
