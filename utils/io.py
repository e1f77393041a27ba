"""Files written so that they survive: atomic writes (a reader never sees a half-written file; an interrupted write
leaves the previous one, and after a crash or power loss the file is the old one or the whole new one), and locks
that die with their process."""

import contextlib
import csv
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable

from utils.errors import UserError

TEMPORARY_PREFIX = ".tmp-"  # atomic_write's temporary files: hidden, so that no reader of a folder takes one
logger = logging.getLogger(__name__)


def fsync(path: str) -> None:
    """Flush a file's or a folder's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, flush it to the disk, rename it onto `path` and
    flush the folder (the rename), so that `path` holds the old file or the whole new one, also after a node crash
    or a power loss. A failed write (a full disk) is one line naming `path`, which is left as it was; the temporary
    file is removed (one left by a killed writer is removed by remove_stale_temporaries)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.basename(path))
        os.close(fd)
        write(tmp_path)
        fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as error:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp_path)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path} ({error.strerror or error}): check the free space and permissions "
                            f"there; the previous file is unchanged") from None
        raise
    try:
        fsync(folder)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):  # file systems that flush no folder
            raise UserError(f"wrote {path}, but cannot flush its folder to the disk ({error.strerror}): a crash "
                            f"now could undo the write; check the file system there") from None


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files that writes killed before their rename left in `folder`. Only for a folder no
    other process writes to (an experiment folder its run holds: utils.experiment.experiment_folder)."""
    for name in sorted(os.listdir(folder)):
        if name.startswith(TEMPORARY_PREFIX):
            os.remove(os.path.join(folder, name))
            logger.info("removed %s, left by a write that was interrupted", os.path.join(folder, name))


def end_with_parent(parent: int) -> None:
    """Initializer of a pool's worker processes: a worker gets SIGKILL when its parent (the process `parent`, which
    started it from its main thread) ends, however it ends (Linux's PR_SET_PDEATHSIG; elsewhere nothing), so that a
    killed run leaves no worker behind, still writing into its folders."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def lock_file(fd: int, path: str, wait: bool, remedy: str) -> bool:
    """Take an exclusive POSIX lock (fcntl.lockf) on the open file `fd` at `path`: True once held, False where
    another process holds it and not `wait`. A POSIX lock belongs to the process that takes it: the children it
    forks (pool and DataLoader workers) do not hold it, and the kernel releases it when the process ends, however it
    ends, even while such children live on (flock's lock is shared with them: a killed process's orphaned workers
    kept it). A file system without locks (Lustre without -o flock or -o localflock, some FUSE mounts) is one line
    with `remedy`; NFS mounted nolock takes the lock, but only among the processes of one node."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if not wait and error.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise UserError(f"cannot lock {path}: its file system does not support locks ({error.strerror}); "
                            f"{remedy}") from None
        raise
    return True


def atomic_write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path` atomically."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w") as f:
            json.dump(obj, f)

    atomic_write(path, write)


def write_csv(path: str, rows: list) -> None:
    """Write dict rows as CSV atomically; the columns are every key of the rows, in the order they first appear
    (a row without a key leaves its cell empty, as does None)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
