"""The budget benchmarks write their tables into the docs only from a full run: ``--quick``
(a few rounds) and ``--no-doc`` print only, so a quick check cannot replace the published
medians. The measuring functions are replaced by canned results: this checks the command
line, not the figures (``test_bench_auto_server.py`` runs the measurement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROW = {"model": "llava-1.5", "size": "784x588", "image": "text:16", "tokens": 576, "keep": 99,
       "reps": 3, "processor_ms": 2.0, "auto_ms": 0.1, "auto_pct": 5.0}


def _doc(tmp_path: Path, begin: str, end: str) -> Path:
    doc = tmp_path / "budgets.md"
    doc.write_text(f"# doc\n{begin}\nold table\n{end}\n")
    return doc


@pytest.mark.parametrize("flags,writes", [([], True), (["--quick"], False),
                                          (["--no-doc"], False)])
def test_auto_server_writes_the_doc_only_from_a_full_run(tmp_path, monkeypatch, flags, writes):
    from benchmarks import auto_server

    monkeypatch.setattr(auto_server, "server_rows", lambda *a, **k: [dict(ROW)])
    doc = _doc(tmp_path, auto_server.BEGIN, auto_server.END)
    before = doc.read_text()
    assert auto_server.main([*flags, "--doc", str(doc), "--json",
                             str(tmp_path / "out.json")]) == 0
    assert (doc.read_text() != before) is writes
    assert (tmp_path / "out.json").exists() is writes
    if writes:
        assert "| llava-1.5 | 784x588 | text:16 | 576 |" in doc.read_text()


@pytest.mark.parametrize("flags,writes", [([], True), (["--quick"], False),
                                          (["--no-doc"], False)])
def test_auto_budget_writes_the_doc_only_from_a_full_run(tmp_path, monkeypatch, flags, writes):
    from benchmarks import auto_budget

    def canned(*a: Any, **k: Any) -> list[dict[str, Any]]:
        return []

    monkeypatch.setattr(auto_budget, "processors", lambda: {"qwen2.5-vl": None})
    for name in ("keep_rows", "cost_rows", "lattice_rows"):
        monkeypatch.setattr(auto_budget, name, canned)
    monkeypatch.setattr(auto_budget, "markdown_keep_preview", lambda rows: "")
    monkeypatch.setattr(auto_budget, "markdown", lambda res: "new table")
    doc = _doc(tmp_path, "<!-- auto-budget:begin -->", "<!-- auto-budget:end -->")
    before = doc.read_text()
    assert auto_budget.main([*flags, "--doc", str(doc), "--json",
                             str(tmp_path / "out.json")]) == 0
    assert (doc.read_text() != before) is writes
    assert (tmp_path / "out.json").exists() is writes
