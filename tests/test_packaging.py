"""The built wheel, not the checkout: it installs into a fresh venv, and the CLI (every stage
entry point included) and the public API import from the installed files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(argv: list, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert run.returncode == 0, f"{argv}: {run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def test_wheel_installs_in_a_fresh_venv_and_its_cli_and_api_import(tmp_path):
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src)
    for pkg in ("pipeline", "softlabels"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src]
    )
    (wheel,) = dist.glob("softlabels-*.whl")

    # A fresh venv; the dependencies (torch & co.) come from this interpreter's site-packages
    # through a .pth line, which adds the folder but not its .pth files: the checkout's
    # editable install stays invisible, so only the wheel can provide `pipeline`/`softlabels`.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout
    (Path(purelib.strip()) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel])

    where = _run(
        [py, "-c", "import pipeline, softlabels; print(pipeline.__file__, softlabels.__file__)"],
        cwd=tmp_path,
    ).stdout
    assert str(REPO) not in where and where.count(str(env_dir)) == 2, where
    api = (
        "import softlabels as sl; assert set(sl.__all__) <= set(dir(sl)) | {'DistillationTrainer'}"
    )
    _run([py, "-c", api + "; sl.DistillationTrainer"], cwd=tmp_path)
    cli = env_dir / "bin" / "softlabels"
    assert "train-student" in _run([cli, "--help"], cwd=tmp_path).stdout
    assert "train_student.alpha" in _run([cli, "train-student", "--help"], cwd=tmp_path).stdout
