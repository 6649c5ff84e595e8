"""File helpers: transparent gzip, line-numbered JSONL, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from retrieval.errors import StarbucksError


def require_file(path: str | os.PathLike, what: str = "file", hint: str = "") -> Path:
    """Return `path` if it is an existing file, else raise one clear line."""
    p = Path(path)
    if not p.is_file():
        raise StarbucksError(f"{what} {p} not found" + (f"; {hint}" if hint else ""))
    return p


def open_text(path: str | os.PathLike, what: str = "file") -> IO[str]:
    """Open a text file for reading; `.gz` files are decompressed transparently."""
    p = require_file(path, what)
    if p.suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def iter_lines(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, str]]:
    """`(line_number, line)` of a UTF-8 text file (`.gz` decompressed); a byte that is not UTF-8 is one
    line naming the file, the line and the byte offset."""
    p = require_file(path, what)
    offset = 0
    with gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = " of the decompressed text" if p.suffix == ".gz" else ""
                raise StarbucksError(
                    f"{p} line {lineno}: byte 0x{raw[err.start]:02x} at byte offset {offset + err.start}{where} is not "
                    f"UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(raw)


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line is a clear error."""
    for lineno, line in iter_lines(path, what):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise StarbucksError(f"{path} line {lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise StarbucksError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile/save on a full disk: no errno


def named_os_error(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` naming `path` where it names no file or a temporary one (`.tmp-*`), so that
    `retrieval.errors.os_error_line` can say which file; a short write without errno is a full disk."""
    code = err.errno
    if code is None and _SHORT_WRITE.search(str(err)):
        code = errno.ENOSPC
    named = isinstance(err.filename, (str, bytes)) and not os.path.basename(os.fsdecode(err.filename)).startswith(
        ".tmp-"
    )
    if code is None or (named and code == err.errno):
        return err
    return OSError(code, os.strerror(code), os.fsdecode(err.filename) if named else str(path))


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OS error of the block as `named_os_error(err, path)`."""
    try:
        yield
    except OSError as err:
        named = named_os_error(err, path)
        if named is err:
            raise
        raise named from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    A job killed mid-write leaves only a `.tmp-*` file, never a file that looks complete; a failed
    write (a full disk, a read-only place) removes it and raises an OSError naming `path`.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a plain file's mode
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_gzip(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """Write text chunks gzipped, atomically, with the same bytes for the same text (no name or time
    in the gzip header)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for chunk in chunks:
                gz.write(chunk.encode("utf-8"))
