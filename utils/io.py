"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves none behind."""

import csv
import json
import os
import tempfile
from collections.abc import Callable

from utils.errors import UserError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path` atomically; a failed write (a full disk) is one line."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w") as f:
            json.dump(obj, f)

    try:
        atomic_write(path, write)
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}): check the free space and permissions "
                        f"there") from None


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
