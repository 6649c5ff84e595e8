"""A lock on a run directory, so that two trainings (or two encoders of one slice) never write it at once.

The lock is an `flock` on a file that records its holder (pid, host, what, since): the kernel
drops it when the holder dies, however it dies, so a lock left by a killed process (a stale lock
file) is never in the way; the file's text only serves the message a second process prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from retrieval.errors import StarbucksError
from retrieval.io import writing


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"{info.get('what', 'another process')} (pid {info.get('pid')} on {info.get('host')}, since {since})"


def _acquire(path: Path, deadline: float) -> int:
    """An fd holding the flock on the file now at `path` (a file unlinked by its last holder is not it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise StarbucksError(
                    f"{path.parent} is in use by {_holder(path)}; wait for it to finish (or stop it) and run this again"
                ) from None
            time.sleep(0.5)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file while we waited: lock the new one


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, what: str, name: str = ".lock", wait: float = 0.0) -> Iterator[Path]:
    """Hold `<directory>/<name>` for the block. Another holder: wait up to `wait` seconds, then one line
    naming it. The lock file is removed on release (and a lock left by a killed process is free)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = _acquire(path, time.monotonic() + wait)
    try:
        record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the flock
