"""Smoke test of ``python -m benchmarks.auto_server``: auto's cost on the API server's own path
(vLLM's multimodal processor of the TokenPrune architecture, ``_tp_auto_keep`` after vLLM's
call of the HF image processor) runs end to end and makes its table. The figures are not
checked: timings belong to the benchmark."""

from __future__ import annotations

from pathlib import Path


def test_auto_server_bench_quick(tmp_path: Path) -> None:
    from benchmarks import auto_server

    rows = auto_server.server_rows(["llava-1.5"], 1, True, tmp_path)
    assert [(r["size"], r["image"].split(":")[0]) for r in rows] == [
        (f"{w}x{h}", cls) for w, h in auto_server.COST_SIZES[:2]
        for cls, _ in auto_server.COST_IMAGES]
    assert all(r["tokens"] == 576 and 1 <= r["keep"] <= 576 and r["auto_ms"] > 0
               for r in rows)
    # the text page keeps more than the photograph, as in the docs' tables
    kept = {r["image"].split(":")[0]: r["keep"] for r in rows if r["size"] == "784x588"}
    assert kept["text"] > kept["photo"], kept
    text = auto_server.markdown({"machine": "m", "command": "c", "rows": rows})
    assert text.count("| llava-1.5 |") == len(rows)
