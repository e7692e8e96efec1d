"""The README's main command, end to end: tiny model, real server with pruning, one request."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def test_readme_main_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_tokenprune.demo", "--model-dir", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[demo] answer" in out
    assert "tokens saved" in out
    line = next(ln for ln in out.splitlines() if "tokens saved" in ln)
    saved = int(line.split("->")[1].split()[0])
    assert saved > 0
