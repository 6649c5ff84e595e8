"""The wheel is the product: built from the source, installed into a fresh virtualenv (not editable),
every command answers `--help` from a directory outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a wheel build, a venv and a dozen interpreters importing torch: ~2.5 min on 2 cores
STAGE_MODULES = ["train", "train.pretrain", "encode", "search", "eval", "experiment", "corpora.debian_pkgs"]


def top_level_packages() -> set[str]:
    """Every importable package of the source tree (a folder with `__init__.py`), tests aside."""
    return {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"}


def run(cmd, cwd: Path, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin, a directory outside the repository) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "data", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "carry"
        ),
    )
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(src),
        ],
        cwd=root,
    )
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=root,
    )
    # The dependencies (torch, transformers, ...) come from this interpreter's site-packages, added after
    # the venv's own; a path in a .pth file does not run the .pth files there, so the editable install of
    # the repository stays out of the fresh venv.
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    Path(purelib.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return python, venv / "bin", outside, env, wheel


def test_the_wheel_holds_every_package(installed):
    *_, wheel = installed
    with zipfile.ZipFile(wheel) as zf:
        packaged = {name.split("/", 1)[0] for name in zf.namelist() if name.endswith("/__init__.py")}
    assert top_level_packages() <= packaged, top_level_packages() - packaged
    assert {"retrieval", "train", "encode", "search", "eval", "experiment", "corpora", "starbucks_cli"} <= packaged


def test_the_installed_packages_come_from_the_wheel(installed):
    python, _, outside, env, _ = installed
    names = sorted(top_level_packages())
    code = f"import importlib; print('\\n'.join(importlib.import_module(n).__file__ for n in {names!r}))"
    files = run([str(python), "-c", code], cwd=outside, env=env).stdout.split()
    venv = python.parent.parent
    assert len(files) == len(names) and all(Path(f).is_relative_to(venv) for f in files), files


def test_every_command_answers_help(installed):
    python, bin_dir, outside, env, _ = installed
    from starbucks_cli import COMMANDS

    listing = run([str(bin_dir / "starbucks"), "--help"], cwd=outside, env=env).stdout
    for name in COMMANDS:
        assert f"  {name} " in listing
        out = run([str(bin_dir / "starbucks"), name, "--help"], cwd=outside, env=env).stdout
        assert out.startswith("usage: "), (name, out)
    for module in STAGE_MODULES:
        out = run([str(python), "-m", module, "--help"], cwd=outside, env=env).stdout
        assert out.startswith("usage: "), (module, out)
    wrong = subprocess.run([str(bin_dir / "starbucks"), "tarin"], cwd=outside, env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "'tarin'" in wrong.stderr
