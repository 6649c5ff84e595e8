"""User-facing errors: one clear line (what is wrong, how to fix it), never a traceback."""

from __future__ import annotations

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


def cli_entry(fn):
    """Wrap a stage's `main(argv)` so a `StarbucksError` prints one line and exits with 2.

    Set `STARBUCKS_DEBUG=1` to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StarbucksError as err:
            if os.environ.get("STARBUCKS_DEBUG"):
                raise
            _close_progress_bars()
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
