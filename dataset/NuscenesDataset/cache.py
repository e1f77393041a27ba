"""On-disk caches of arrays derived from the nuScenes tables (the 2D labels, the BEV samples).

A cache is one .npz file of plain arrays (no pickle), written atomically, with the key of what it was built from
stored in it. It is built by one process at a time: the others wait on a file lock (utils.io.lock_file, released
by the kernel when the builder dies), never inside a torch.distributed collective, then read what the builder
wrote. The key of the tables is each table file's name, size and modification time, so a changed table is noticed
without hashing gigabytes at every start (copies of a dataset on several nodes differ in it: docs/data.md).
"""

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from utils.errors import UserError
from utils.io import atomic_write, lock_file

KEY_ARRAY = "dstorch_cache_key"
logger = logging.getLogger(__name__)


def tables_key(table_root: str) -> list:
    """[name, size in bytes, modification time in ns] of each table file: any rewrite of a table changes it."""
    key = []
    for name in sorted(os.listdir(table_root)):
        if name.endswith(".json"):
            stat = os.stat(os.path.join(table_root, name))
            key.append([name, stat.st_size, stat.st_mtime_ns])
    return key


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def read_arrays(path: str) -> dict:
    """The arrays of a cache file; a file that is not one is reported as corrupt."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"cache {path} is corrupt ({type(error).__name__}: {str(error)[:200]}): delete it and run "
                        f"again to rebuild it") from None


def write_arrays(path: str, arrays: dict) -> None:
    def write(tmp_path: str) -> None:
        with open(tmp_path, "wb") as f:  # a file object, so that numpy adds no .npz suffix to the name
            np.savez(f, **arrays)

    atomic_write(path, write)


def stored_key(path: str) -> str | None:
    """The key stored in the cache file at `path` (reading only that array), or None if there is no file."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return str(archive[KEY_ARRAY])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"cache {path} is corrupt ({type(error).__name__}: {str(error)[:200]}): delete it and run "
                        f"again to rebuild it") from None


@contextmanager
def file_lock(path: str, what: str):
    """Hold an exclusive lock on the file `path` (created if missing) for the block; while another process holds
    it, log once and wait."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserError(f"cannot create {path} ({error.strerror}): make its folder writable, or set "
                        f"'label_cache_dir' in config/data.json to a writable folder") from None
    remedy = ("keep the dataset and 'label_cache_dir' of config/data.json on a local disk, or make them first with "
              "python -m dataset.NuscenesDataset.prepare")
    try:
        if not lock_file(fd, path, wait=False, remedy=remedy):
            logger.info("another process is building %s: waiting for it (lock %s)", what, path)
            lock_file(fd, path, wait=True, remedy=remedy)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_arrays(path: str, key: str, build: Callable[[], dict], what: str) -> dict:
    """The arrays cached at `path` if their key is `key`; otherwise build() them (one process at a time, see the
    module docstring), store them with the key, and return them."""
    if stored_key(path) == key:
        return read_arrays(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache folder {folder} ({error.strerror}): set 'label_cache_dir' in "
                        f"config/data.json to a writable folder") from None
    with file_lock(f"{path}.lock", what):
        if stored_key(path) == key:  # built by the process we waited for
            return read_arrays(path)
        if os.path.exists(path):
            logger.info("%s in %s is out of date: rebuilding it", what, path)
        arrays = {**build(), KEY_ARRAY: np.array(key)}
        write_arrays(path, arrays)
    return arrays
