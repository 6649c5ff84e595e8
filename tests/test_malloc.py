"""The stages' allocator setting (`retrieval.malloc`): large tensors come from the heap, not fresh pages."""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from retrieval.malloc import glibc

PROBE = textwrap.dedent(
    """
    import ctypes, os, sys
    import torch
    from retrieval.malloc import glibc, tune_malloc

    class Info(ctypes.Structure):  # mallinfo2 (glibc >= 2.33): hblks is the count of mmapped blocks
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = glibc()
    libc.mallinfo2.restype = Info
    tuned = tune_malloc()
    before = libc.mallinfo2().hblks
    x = torch.empty(20 << 20, dtype=torch.uint8)  # 20 MiB: above glibc's starting mmap threshold
    print(tuned, libc.mallinfo2().hblks - before)
    """
)


def probe(env_value: str | None) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "STARBUCKS_MALLOC_TUNE"}
    if env_value is not None:
        env["STARBUCKS_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    tuned, mapped = out.stdout.split()
    return tuned, int(mapped)


@pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_tuned_allocator_serves_large_tensors_from_the_heap():
    assert probe(None) == ("True", 0)  # the heap serves it
    assert probe("0") == ("False", 1)  # glibc's default: a fresh mapping


def test_command_lines_tune_the_allocator(monkeypatch):
    import retrieval.malloc as malloc
    from retrieval.errors import cli_entry

    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(1) or True)
    assert cli_entry(lambda: 7)() == 7 and calls == [1]
