"""Mutation check: plant each class of bug the tests exist to catch, and show which test fails.

Each mutation is an exact text replacement in one file of a temporary copy of the working tree
(tracked and untracked, not ignored, files; the original is never touched). The script runs the
tests meant to catch it on that copy, with ``PYTHONPATH`` pointing at the copy so that pytest and
the vLLM servers it starts (their plugin is imported by name) load the mutated package, and
records which of them fail. A mutation whose text is not found exactly once stops the script:
the code moved, and the mutation must be updated, not skipped. The same tests run once on an
unmutated copy first (they must all pass, or a failure would mean nothing).

It starts real vLLM servers (one family's pair per mutation, about 1.5 min each), so it is not
part of the default test run. Run it under the server lock and commit the table it writes::

    flock /work/locks/vllm-server.lock .venv/bin/python scripts/mutation_check.py
    # a subset: --only norm_reversed text_salt_removed; --no-baseline; --list

Writes ``docs/mutation.md`` (``--out``): bug class, where it was planted, the tests run, which
of them failed. Exit status 1 if a mutation was not caught or the baseline failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAVA_REF = "tests/test_llava_server.py::TestLlava::test_logprobs_match_transformers_reference"
QWEN2_REF = "tests/test_qwen2_vl_server.py::TestQwen2VL::test_logprobs_match_transformers_reference"
QWEN25 = "tests/test_qwen2_5_vl_server.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # the bug class, as the table shows it
    path: str  # file, relative to the repo root
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids (or "file -k expr")
    note: str = ""  # shown in the table


MUTATIONS = [
    Mutation(
        "wrong_method", "another method's kept set (LRCP serves SVD-Prune's selection)",
        "vllm_tokenprune/models/model_hooks.py",
        "            [params[i].num_keep for i in items],\n            method,\n",
        "            [params[i].num_keep for i in items],\n"
        "            {'lrcp': 'svd_prune'}.get(method, method),\n",
        (f"{LLAVA_REF}[lrcp]",),
    ),
    Mutation(
        "off_by_one", "kept indices off by one (every kept row replaced by the next)",
        "vllm_tokenprune/models/model_hooks.py",
        "            for i, idx in zip(items, selected, strict=True):\n"
        "                keep_idx[i] = idx\n",
        "            for i, idx in zip(items, selected, strict=True):\n"
        "                keep_idx[i] = (idx + 1) % feats[i].shape[0]\n",
        (f"{LLAVA_REF}[lrcp]",),
    ),
    Mutation(
        "first_k", "the first k tokens kept instead of the selected k",
        "vllm_tokenprune/models/model_hooks.py",
        "            for i, idx in zip(items, selected, strict=True):\n"
        "                keep_idx[i] = idx\n",
        "            for i, idx in zip(items, selected, strict=True):\n"
        "                keep_idx[i] = torch.arange(idx.numel(), device=idx.device)\n",
        (f"{QWEN2_REF}[lrcp]",),
    ),
    Mutation(
        "swap_hw", "M-RoPE h and w positions swapped (non-square grids)",
        "vllm_tokenprune/models/positions.py",
        "pos = torch.stack([grid_t, grid_h, grid_w], dim=-1)",
        "pos = torch.stack([grid_t, grid_w, grid_h], dim=-1)",
        (f"{QWEN2_REF}[lrcp]",),
    ),
    Mutation(
        "column_offset", "M-RoPE w position one column off for every media token",
        "vllm_tokenprune/models/positions.py",
        "grid_w = torch.arange(w).view(1, 1, w).expand(t, h, w)",
        "grid_w = (torch.arange(w) + 1).view(1, 1, w).expand(t, h, w)",
        (f"{QWEN25}::test_prefix_cached_request_matches_reference",
         f"{QWEN25}::TestQwen2_5_VL::test_two_images_match_transformers_reference[lrcp]"),
    ),
    Mutation(
        "norm_reversed", "norm keeps the smallest-norm tokens",
        "vllm_tokenprune/scoring/norm.py",
        "return select_top(_row_norms(batch), batch.mask(), batch.num_keep)",
        "return select_top(-_row_norms(batch), batch.mask(), batch.num_keep)",
        ("tests/test_scoring_properties.py -k norm",
         "tests/test_preview.py -k norm_selection"),
        "a scorer bug is on both sides of the server reference tests (the preview runs the "
        "same scorer): the oracles catch it",
    ),
    Mutation(
        "lrcp_uncentred", "LRCP without centring (not the PCA residual)",
        "vllm_tokenprune/scoring/lrcp.py",
        "    scores, mask = lrcp_scores(batch, opts)\n",
        "    import dataclasses\n"
        "    scores, mask = lrcp_scores(batch, dataclasses.replace(opts, center=False))\n",
        ("tests/test_scoring_properties.py -k exact_pca",),
        "as for norm",
    ),
    Mutation(
        "text_salt_removed", "the prompt text left out of a text-conditioned item's cache key",
        "vllm_tokenprune/cache_keys.py",
        '"text": None if text_ids is None else [int(t) for t in text_ids],',
        '"text": None,',
        (f"{QWEN25}::test_text_conditioned_cache_keys",),
    ),
    Mutation(
        "methods_swapped", "two concurrent requests' methods swapped inside one encoder batch",
        "vllm_tokenprune/models/model_hooks.py",
        "        for method, items in by_method.items():\n",
        "        groups = list(by_method.items())\n"
        "        if len(groups) > 1:\n"
        "            groups[0], groups[1] = ((groups[0][0], groups[1][1]),\n"
        "                                    (groups[1][0], groups[0][1]))\n"
        "        for method, items in groups:\n",
        ("tests/test_worker_safety_units.py -k mixed_batch",
         f"{QWEN25}::TestQwen2_5_VL::test_concurrent_mixed_batch"),
        "the unit test always; the server mix test only when the scheduler puts two requests' "
        "images in one encoder batch (timing, docs/testing.md)",
    ),
]


def copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def plant(tree: Path, m: Mutation) -> None:
    path = tree / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.name}: the text to replace occurs {count} times in "
                         f"{m.path} (expected once); update the mutation")
    path.write_text(text.replace(m.old, m.new))


def pytest_args(tests: tuple[str, ...]) -> list[list[str]]:
    """One pytest invocation per ``-k`` selection, one for all plain node ids."""
    plain = [t for t in tests if " -k " not in t]
    runs = [plain] if plain else []
    for t in tests:
        if " -k " in t:
            path, expr = t.split(" -k ", 1)
            runs.append([path, "-k", expr])
    return runs


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> tuple[set[str], set[str], str]:
    """(failed test ids, passed test ids, output tail) of ``tests`` run on ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree), TOKENPRUNE_TEST_LOGS=str(tree / ".test-logs"))
    failed: set[str] = set()
    passed: set[str] = set()
    tail = ""
    for i, args in enumerate(pytest_args(tests)):
        report = tree / f"report-{i}.xml"
        cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider",
               f"--basetemp={tree / f'.pytest-tmp-{i}'}", f"--junitxml={report}"]
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            tail += proc.stdout[-1500:]
        except subprocess.TimeoutExpired:
            tail += f"timed out after {timeout} s: {' '.join(args)}\n"
        if not report.exists():
            failed.add(" ".join(args) + " (no report)")
            continue
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}::{case.get('name')}"
            bad = case.find("failure")
            bad = bad if bad is not None else case.find("error")
            if bad is not None:
                failed.add(name)
                tail += f"{name}: {(bad.get('message') or '')[:300]}\n"
            elif case.find("skipped") is None:
                passed.add(name)
    return failed, passed, tail


def short(test_id: str) -> str:
    """``tests/test_x_server/TestX::test_y[p]`` -> ``test_x_server.py::test_y[p]``."""
    path, _, name = test_id.partition("::")
    parts = path.split("/")
    module = next((p for p in parts if p.startswith("test_")), parts[-1])
    return f"{module}.py::{name}"


def summary(failed: set[str]) -> str:
    """The failed tests, parametrized cases of one test folded into one entry."""
    groups: dict[str, list[str]] = {}
    for t in sorted(short(t) for t in failed):
        groups.setdefault(t.split("[")[0], []).append(t)
    return ", ".join(f"`{v[0]}`" if len(v) == 1 else f"`{k}` ({len(v)} cases)"
                     for k, v in groups.items())


def write_table(out: Path, rows: list[tuple[Mutation, set[str], float]], baseline: str,
                command: str) -> None:
    lines = [
        "# Mutation check: which test catches each planted bug",
        "",
        "Generated by `scripts/mutation_check.py` (its docstring says how it works): each row's",
        "bug is planted, by an exact text replacement, in a temporary copy of the project, and",
        "the tests meant to catch it run on that copy against real vLLM CPU servers (the",
        "mutated plugin loaded in them). \"Caught by\" lists the tests that failed. A planted",
        "bug no test catches is a gap to close in the tests, not a row to delete.",
        "",
        f"Baseline (the same tests, unmutated): {baseline}.",
        "",
        "| bug class | planted in | caught by | result | note |",
        "|---|---|---|---|---|",
    ]
    for m, failed, secs in rows:
        caught = summary(failed) or "–"
        result = f"caught ({secs:.0f} s)" if failed else f"**not caught** ({secs:.0f} s)"
        lines.append(f"| {m.bug} | `{m.path}` | {caught} | {result} | {m.note} |")
    lines += ["", f"Command: `{command}`", ""]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mutation.md")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug} ({m.path}) -> {', '.join(m.tests)}")
        return 0
    ok = True
    baseline = "not run"
    with tempfile.TemporaryDirectory(prefix="tokenprune-mutation-") as tmp:
        if not args.no_baseline:
            tree = Path(tmp) / "baseline"
            copy_tree(tree)
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            start = time.monotonic()
            failed, passed, tail = run_tests(tree, tests, args.timeout)
            secs = time.monotonic() - start
            print(f"[baseline] {len(passed)} passed, {len(failed)} failed in {secs:.0f} s",
                  flush=True)
            if failed or not passed:
                print(tail)
                ok = False
            baseline = (f"{len(passed)} tests passed, {len(failed)} failed "
                        f"({secs:.0f} s)")
            shutil.rmtree(tree, ignore_errors=True)
        rows = []
        for m in chosen:
            tree = Path(tmp) / m.name
            copy_tree(tree)
            plant(tree, m)
            start = time.monotonic()
            failed, passed, tail = run_tests(tree, m.tests, args.timeout)
            secs = time.monotonic() - start
            print(f"[{m.name}] failed: {sorted(failed) or 'NONE'} ({secs:.0f} s)", flush=True)
            print(tail, flush=True)
            if not failed:
                ok = False
            rows.append((m, failed, secs))
            shutil.rmtree(tree, ignore_errors=True)
    command = "python scripts/mutation_check.py" + (
        f" --only {' '.join(args.only)}" if args.only else "")
    write_table(args.out, rows, baseline, command)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
