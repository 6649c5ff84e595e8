"""Checkpoint directories, written whole or not at all.

`<run>/checkpoints/checkpoint-<step>/` holds
- `model/`: the plain HF model plus `starbucks.json` (usable by encode as it is);
- `state/`: accelerate's `save_state` (weights, optimizer, scheduler, RNG states);
- `trainer_state.json`: step, epoch and the fingerprint of the settings a resume must share.
A checkpoint is assembled under `.tmp-checkpoint-<step>` and renamed when complete, so any
`checkpoint-<step>` directory is complete; `.tmp-*` leftovers of a killed run are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from retrieval.errors import StarbucksError
from retrieval.io import writing

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class Checkpoints:
    """The checkpoints of one run, newest `keep` kept (all when `keep` is falsy)."""

    def __init__(self, root: str | os.PathLike, keep: int | None = None):
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        """`(step, path)` of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def staging(self, step: int) -> Path:
        """The temporary directory a checkpoint of `step` is assembled in (the same on every rank)."""
        return self.root / f".tmp-checkpoint-{step}"

    def commit(self, staging: Path, step: int) -> Path:
        """Rename a finished staging directory into place and drop the oldest beyond `keep`."""
        final = self.root / f"checkpoint-{step}"
        replace_dir(staging, final)
        if self.keep:
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def clear_staging(self) -> None:
        if self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_TORCH_WRITE = ("inline_container", "PytorchStreamWriter")  # torch.save's failure names neither file nor cause
_OS_CODE = re.compile(r"os error (\d+)")  # safetensors: "I/O error: No space left on device (os error 28)"
NEARLY_FULL = 64 << 20  # bytes free below which a torch.save that failed met a full disk


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def saving(path: str | os.PathLike) -> Iterator[None]:
    """Write a checkpoint or model at `path` in the block; a failed write is an OSError naming `path`, which a
    stage's entry prints as one line (`retrieval.errors.cli_entry`): torch.save's RuntimeError is a full
    disk when under `NEARLY_FULL` bytes are left (else an I/O error), safetensors' error carries its errno."""
    path = Path(path)
    with writing(path):
        try:
            yield
        except Exception as err:
            if type(err).__name__ == "SafetensorError" and _OS_CODE.search(str(err)):
                code = int(_OS_CODE.search(str(err)).group(1))
            elif isinstance(err, RuntimeError) and any(k in str(err) for k in _TORCH_WRITE):
                code = errno.ENOSPC if _free_bytes(path) < NEARLY_FULL else errno.EIO
            else:
                raise
            raise OSError(code, os.strerror(code), str(path)) from err


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StarbucksError(f"{path} cannot be read ({err}); delete that checkpoint directory and re-run") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` onto `dst`, replacing an existing `dst` (renames only, same filesystem)."""
    dst = Path(dst)
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}.", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def staging_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`, for building it before `replace_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
