"""Third-party method packages for the tests: built as wheels and installed into a directory of
their own (``pip install --no-deps --target``), never into the test venv, so only the processes
that get the directory on ``PYTHONPATH`` (a server, a subprocess) see their entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "method-package"
#: The example package's method.
EXAMPLE_METHOD = "mean_distance"


def install(src: Path, target: Path, work: Path) -> Path:
    """Build the package at ``src`` into a wheel (offline, from a copy: nothing is written next
    to the sources) and install it into ``target``."""
    build = work / f"src-{src.name}"
    shutil.copytree(src, build, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    dist = work / f"dist-{src.name}"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(build)])
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(target),
          *map(str, dist.glob("*.whl"))])
    return target


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def second_package(work: Path, method: str = "zz_second") -> Path:
    """A second, minimal method package (one method, no options), written under ``work``."""
    src = work / "second-package"
    (src / "tokenprune_second").mkdir(parents=True)
    (src / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tokenprune-second"
version = "0.1.0"

[project.entry-points."vllm_tokenprune.methods"]
{method} = "tokenprune_second:register"

[tool.setuptools]
packages = ["tokenprune_second"]
""")
    (src / "tokenprune_second" / "__init__.py").write_text(f"""\
import torch

from vllm_tokenprune import register_method


def register():
    @register_method({method!r}, summary="the first tokens")
    def first(batch, opts):
        return [torch.arange(k, device=batch.device) for k in batch.num_keep]
""")
    return src


def python_path(*dirs: Path) -> str:
    """``PYTHONPATH`` with ``dirs`` first."""
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])
