"""User-facing errors: one clear line (what is wrong, how to fix it), never a traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys


class StarbucksError(Exception):
    """An error the user caused and can fix; printed as one line by `cli_entry`."""


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so that the error starts a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - a declared dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


_RESUME = "re-run the same command: finished work is kept and the run resumes where it stopped"
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device for {file}; free space (or choose another output_dir) and " + _RESUME,
    errno.EDQUOT: "disk quota exceeded for {file}; free space (or choose another output_dir) and " + _RESUME,
    errno.EROFS: "{file} is on a read-only file system; choose another output_dir (or paths.*) in a writable "
    "place and re-run",
    errno.EACCES: "no permission to use {file}; fix its permissions or choose another output_dir (or paths.*), "
    "and re-run",
    errno.EIO: "input/output error on {file}; the disk may be failing or full: check it and " + _RESUME,
}
_OS_ADVICE[errno.EPERM] = _OS_ADVICE[errno.EACCES]


def os_error_line(err: OSError) -> str | None:
    """One line for an OS error of a stage's own reads and writes (no space, read-only, permission, I/O):
    the file and what to do; None for others (a missing file is the stage's own check)."""
    advice = _OS_ADVICE.get(err.errno)
    if advice is None:
        return None
    file = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes)) else "a file it writes"
    return advice.format(file=file)


def cli_entry(fn):
    """Wrap a stage's `main(argv)` so a `StarbucksError`, or an OS error the user can fix (`os_error_line`:
    a full disk, a read-only place, ...), prints one line and exits with 2.

    Set `STARBUCKS_DEBUG=1` to see the full traceback instead. The process's allocator is set for tensor
    work first (`retrieval.malloc.tune_malloc`; `STARBUCKS_MALLOC_TUNE=0` leaves it).
    """

    def fail(line: str):
        _close_progress_bars()
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from retrieval.malloc import tune_malloc

        tune_malloc()
        try:
            return fn(*args, **kwargs)
        except StarbucksError as err:
            if os.environ.get("STARBUCKS_DEBUG"):
                raise
            fail(str(err))
        except OSError as err:
            line = os_error_line(err)
            if line is None or os.environ.get("STARBUCKS_DEBUG"):
                raise
            fail(line)
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
