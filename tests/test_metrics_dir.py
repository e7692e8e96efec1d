"""The worker-to-API-server metrics directory never fails a server's start (read-only root
filesystems: Kubernetes readOnlyRootFilesystem). Unwritable parents are real: a path under a
regular file cannot be created, as under a read-only mount (root ignores permission bits)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from vllm_tokenprune.metrics import exchange as metrics


@pytest.fixture
def unwritable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return str(blocker / "sub")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(metrics.METRICS_DIR_ENV, raising=False)


def test_falls_back_to_the_next_writable_parent(unwritable, tmp_path):
    path = metrics.ensure_metrics_dir(parents=(unwritable, str(tmp_path)))
    assert path is not None and os.path.dirname(path) == str(tmp_path) and os.path.isdir(path)
    assert os.environ[metrics.METRICS_DIR_ENV] == path


def test_no_writable_parent_starts_without_scorer_timings(unwritable):
    assert metrics.ensure_metrics_dir(parents=(unwritable,)) is None
    assert metrics.METRICS_DIR_ENV not in os.environ


def test_configured_dir_is_created_or_dropped(unwritable, tmp_path, monkeypatch):
    wanted = tmp_path / "configured" / "dir"
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(wanted))
    assert metrics.ensure_metrics_dir() == str(wanted) and wanted.is_dir()
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, unwritable)
    assert metrics.ensure_metrics_dir() is None
    assert metrics.METRICS_DIR_ENV not in os.environ


def test_register_survives_an_unwritable_temp_dir(unwritable, monkeypatch):
    """plugin.register() in a `vllm serve` process with TMPDIR unusable and no fallback."""
    from vllm_tokenprune import plugin

    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "m"])
    monkeypatch.setattr(tempfile, "tempdir", unwritable)
    monkeypatch.setattr(metrics.ensure_metrics_dir, "__defaults__", ((None,),))
    plugin.register()
    assert metrics.METRICS_DIR_ENV not in os.environ
