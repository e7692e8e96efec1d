#!/usr/bin/env python3
"""Check every vLLM internal the plugin uses against another vLLM release's source, unimported.

``vllm_tokenprune._vllm_internals.INTERNALS`` lists each vLLM class, hook and runner contract
the plugin relies on; ``tests/test_vllm_internals.py`` checks them against the *installed*
vLLM by importing it. This script checks them against a release that is not installed (one
that cannot be, such as the GPU wheel on a CPU machine): it reads both releases' Python files
with :mod:`ast` and, for every entry,

* finds the definition (module file, class, function, attribute or assignment; through
  imports, ``import *``, ``TYPE_CHECKING`` imports and vLLM base classes);
* compares it with the baseline release as the entry's ``comparison`` says (``code``: the
  normalised AST, docstrings stripped, with a short diff; ``signature``: parameter names, kinds
  and defaults; ``members``: a class's member names and method signatures; ``presence``);
* translates the entry's ``check`` (``check.spec``: uses / params / has / method_params /
  subclass_of) into the same test on the source; what cannot be decided from source is
  reported as "needs import", never as passing.

Usage (from the repository root; the baseline defaults to the installed ``vllm`` package,
found without importing it)::

    python scripts/check_vllm_source.py --version 0.33.0                 # pip download, table
    python scripts/check_vllm_source.py --version 0.33.0 --write-doc docs/vllm-versions.md
    python scripts/check_vllm_source.py --source vllm-0.33.0-....whl --baseline DIR_OR_WHEEL

The wheel or sdist is fetched with ``pip download vllm==VERSION --no-deps`` into
``~/.cache/vllm-tokenprune/wheels`` (reused when present) and read in place: nothing is
installed or imported. Exit status 1 when an entry is missing or its check fails.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# imported as scripts.check_vllm_source (tests/test_vllm_source.py), or run as
# `python scripts/check_vllm_source.py` (this file's directory is sys.path[0])
_reader = importlib.import_module(
    f"{__package__}.vllm_source_reader" if __package__ else "vllm_source_reader")
FUNCS, Def, NotFound, Resolver, Tree = (
    _reader.FUNCS, _reader.Def, _reader.NotFound, _reader.Resolver, _reader.Tree)
class_members, code_of, method_bodies = (
    _reader.class_members, _reader.code_of, _reader.method_bodies)
short_diff, signature, static_check = _reader.short_diff, _reader.signature, _reader.static_check

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "vllm-tokenprune" / "wheels"


def load_internals(root: Path = ROOT) -> ModuleType:
    """``vllm_tokenprune/_vllm_internals.py`` loaded by path (the package needs torch; this
    module needs only the standard library)."""
    path = root / "vllm_tokenprune" / "_vllm_internals.py"
    spec = importlib.util.spec_from_file_location("_tokenprune_vllm_internals", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def spec_text(spec: tuple[Any, ...] | None) -> str:
    if spec is None:
        return ""
    op, args = spec
    if op == "method_params":
        return f"{args[0]}({', '.join(args[1:])})"
    return f"{op}: {', '.join(args)}"


def contract_text(item: Any) -> str:
    """The compared contract of an inventory entry, as the doc's table shows it."""
    spec = spec_text(getattr(item.check, "spec", None))
    if item.check is not None and not spec:
        spec = "custom check (needs import)"
    return item.comparison + (f"; {spec}" if spec else "")


# ------------------------------------------------------------------------------------ report


def module_changes(old: Tree, new: Tree, modules: list[str]) -> list[tuple[str, str]]:
    """Per module file: ``identical`` or the number of changed source lines (comments and
    docstrings included: context for the per-entry results, not a verdict)."""
    out = []
    for module in modules:
        a_rel, b_rel = old.module_file(module), new.module_file(module)
        if a_rel is None or b_rel is None:
            out.append((module, "absent in " + ("both" if a_rel == b_rel else
                                                old.version if a_rel is None else new.version)))
            continue
        a, b = (old.read(a_rel) or "").splitlines(), (new.read(b_rel) or "").splitlines()
        n = sum(1 for line in difflib.unified_diff(a, b, n=0, lineterm="")
                if line[:1] in "+-" and not line.startswith(("+++", "---")))
        out.append((module, "identical" if n == 0 else f"{n} lines changed"))
    return out


def defining_modules(results: list[Result]) -> list[str]:
    mods = {r.target.partition(":")[0] for r in results}
    mods |= {w.partition(":")[0] for r in results for w in r.defined_at}
    return sorted(mods)


@dataclass
class Result:
    target: str
    contract: str
    status: str  # identical | changed | missing | check fails | needs import
    check: str
    note: str = ""
    diff: str = ""
    info: list[str] = field(default_factory=list)
    #: where the definition is written, in the compared release (``module:Qual``)
    defined_at: list[str] = field(default_factory=list)


def compare(item: Any, old: Resolver, new: Resolver) -> Result:
    spec = getattr(item.check, "spec", None)
    contract = contract_text(item)
    a, b = old.target(item.target), new.target(item.target)
    if isinstance(b, NotFound):
        status = "needs import" if b.needs_import else "missing"
        return Result(item.target, contract, status, "-", b.reason)
    check = static_check(new, b, spec)
    if item.check is not None and spec is None:
        check = "needs import: custom check"
    note = ""
    if isinstance(a, NotFound):
        return Result(item.target, contract, "needs import" if a.needs_import else "changed",
                      check, f"not in the baseline ({a.reason})")
    if a.where != b.where:
        note = f"defined at {b.where} (was {a.where}); "
    elif b.where != item.target and b.qual:
        note = f"defined at {b.where}; "
    base_check = static_check(old, a, spec)
    if base_check != "ok" and check == "ok":
        note += f"baseline check: {base_check}; "
    mode = item.comparison
    diff, info = "", []
    changed = False
    if mode == "code" or (mode == "signature" and not isinstance(b.node, FUNCS)):
        old_code, new_code = code_of(a.node), code_of(b.node)
        changed = old_code != new_code
        diff = short_diff(old_code, new_code) if changed else ""
    elif mode == "signature":
        if not isinstance(a.node, FUNCS):
            changed, note = True, note + "was not a function"
        else:
            changed = signature(a.node) != signature(b.node)
            if changed:
                diff = f"- {signature(a.node)}\n+ {signature(b.node)}"
            elif code_of(a.node) != code_of(b.node):
                info.append("body changed (signature same)")
                diff = short_diff(code_of(a.node), code_of(b.node))
    elif mode == "members":
        ca = old.instance_class(a) if isinstance(a.node, (ast.Assign, ast.AnnAssign)) else a
        cb = new.instance_class(b) if isinstance(b.node, (ast.Assign, ast.AnnAssign)) else b
        if not (isinstance(ca, Def) and isinstance(cb, Def)
                and isinstance(ca.node, ast.ClassDef) and isinstance(cb.node, ast.ClassDef)):
            changed = code_of(a.node) != code_of(b.node)
        else:
            ma, mb = class_members(old, ca), class_members(new, cb)
            lines = [f"- {k}: {ma[k]}" for k in sorted(ma) if k not in mb]
            lines += [f"+ {k}: {mb[k]}" for k in sorted(mb) if k not in ma]
            lines += [f"~ {k}: {ma[k]} -> {mb[k]}" for k in sorted(ma)
                      if k in mb and ma[k] != mb[k]]
            changed = bool(lines)
            diff = "\n".join(lines)
            ba, bb = method_bodies(ca), method_bodies(cb)
            bodies = sorted(k for k in ba if k in bb and ba[k] != bb[k])
            if bodies:
                info.append("method bodies changed: " + ", ".join(bodies))
    status = "changed" if changed else "identical"
    if check != "ok":
        status = "needs import" if check.startswith("needs import") else "check fails"
    return Result(item.target, contract, status, check, note.rstrip("; "), diff, info,
                  [b.where])


def run(items: Any, old: Tree, new: Tree) -> list[Result]:
    ro, rn = Resolver(old), Resolver(new)
    return [compare(item, ro, rn) for item in items]


def table(results: list[Result]) -> str:
    rows = [f"{'status':<13} {'target':<96} contract"]
    for r in results:
        extra = "; ".join(x for x in (r.note, *r.info) if x)
        check = "" if r.check == "ok" else f"  [check: {r.check}]"
        rows.append(f"{r.status:<13} {r.target:<96} {r.contract}{check}"
                    + (f"  ({extra})" if extra else ""))
    return "\n".join(rows)


def summary(results: list[Result]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = ("identical", "changed", "missing", "check fails", "needs import")
    return ", ".join(f"{counts[k]} {k}" for k in order if k in counts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: list[Result], old: Tree, new: Tree, command: str,
             full: bool = True) -> str:
    """The generated section of docs/vllm-versions.md (between its markers)."""
    out = [f"<!-- check_vllm_source: begin {new.version} -->",
           f"Generated by `{command}`: baseline vLLM {old.version} (`{_where(old)}`), compared "
           f"vLLM {new.version} (`{_where(new)}`), read with `ast`, nothing imported. "
           f"{len(results)} inventory entries: {summary(results)}.", ""]
    if full:
        out += ["| # | target | compared; static check | result | note |",
                "|---|---|---|---|---|"]
        for i, r in enumerate(results, 1):
            note = "; ".join(x for x in (r.note, *r.info) if x)
            result = r.status if r.check in ("ok", "-") else f"{r.status}: {r.check}"
            out.append(f"| {i} | `{r.target}` | {_cell(r.contract)} | {_cell(result)} | "
                       f"{_cell(note)} |")
        out += ["", f"Module files holding these definitions ({old.version} -> {new.version}, "
                    "raw lines, comments included):", "",
                "| module | source lines |", "|---|---|"]
        out += [f"| `{m}` | {c} |" for m, c in module_changes(old, new,
                                                              defining_modules(results))]
        diffs = list({r.target: r for r in results if r.diff}.values())  # one per target
        if diffs:
            out += ["", "Diffs (normalised source, docstrings and comments left out; "
                        f"`-` {old.version}, `+` {new.version}):", ""]
            for r in diffs:
                kind = r.status if r.status != "identical" else "; ".join(r.info)
                out += [f"<details><summary><code>{r.target}</code>: {kind}</summary>", "",
                        "```diff", r.diff, "```", "</details>", ""]
    else:
        odd = [r for r in results if r.status != "identical" or r.info]
        out += [f"- `{r.target}`: {r.status} {'; '.join(r.info)} {r.note}".rstrip()
                for r in odd] or ["Every entry identical."]
    out.append(f"<!-- check_vllm_source: end {new.version} -->")
    return "\n".join(out)


def _where(tree: Tree) -> str:
    p = tree.path
    return p.name if p.suffix == ".whl" or p.name.endswith(".tar.gz") else \
        "installed package" if "site-packages" in str(p) else str(p)


def write_section(doc: Path, section: str, version: str) -> None:
    """Replace the generated section for ``version`` in ``doc`` (append it if absent)."""
    text = doc.read_text() if doc.exists() else ""
    begin = f"<!-- check_vllm_source: begin {version} -->"
    end = f"<!-- check_vllm_source: end {version} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


# ----------------------------------------------------------------------------------- sources


def installed_vllm() -> Path:
    """The installed ``vllm`` package directory, found without importing it."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no vllm installed here: pass --baseline (a wheel, sdist or directory)")
    return Path(next(iter(spec.submodule_search_locations)))


def fetch(version: str, cache: Path = CACHE) -> Path:
    """``vllm==version``'s wheel (or sdist) in ``cache``, downloaded once (no install)."""
    def present() -> list[Path]:
        return sorted(cache.glob(f"vllm-{version}-*.whl")) + \
            sorted(cache.glob(f"vllm-{version}.tar.gz"))

    if not present():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
               "-d", str(cache)]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    found = present()
    if not found:
        raise SystemExit(f"pip download left no vllm-{version} wheel or sdist in {cache}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", help="vLLM release to check (pip download vllm==VERSION)")
    ap.add_argument("--source", type=Path, help="a vLLM wheel, sdist or source directory "
                    "instead of downloading")
    ap.add_argument("--baseline", type=Path,
                    help="the release compared against (default: the installed vllm)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--write-doc", type=Path, help="write the generated section into this file")
    ap.add_argument("--summary-only", action="store_true",
                    help="in --write-doc, list only entries that are not identical (a control)")
    ap.add_argument("--diffs", action="store_true", help="print the diffs too")
    args = ap.parse_args(argv)
    if args.source is None and args.version is None:
        ap.error("give --version or --source")
    source = args.source or fetch(args.version, args.cache_dir)
    old = Tree(args.baseline or installed_vllm())
    new = Tree(source)
    internals = load_internals()
    results = run(internals.INTERNALS, old, new)
    print(f"baseline vLLM {old.version} ({old.path}); compared vLLM {new.version} ({new.path})")
    print(table(results))
    print(f"\n{len(results)} entries: {summary(results)}")
    if args.diffs:
        for r in results:
            if r.diff:
                print(f"\n== {r.target} ({r.status}{'; ' if r.info else ''}{'; '.join(r.info)})")
                print(r.diff)
    if args.write_doc:
        shown = ["python scripts/check_vllm_source.py"]
        shown += [f"--version {args.version}"] if args.version else [f"--source {source.name}"]
        if args.baseline:
            shown.append(f"--baseline {args.baseline.name}")
        if args.summary_only:
            shown.append("--summary-only")
        shown.append(f"--write-doc {args.write_doc}")
        write_section(args.write_doc, markdown(results, old, new, " ".join(shown),
                                               full=not args.summary_only), new.version)
        print(f"wrote the vLLM {new.version} section of {args.write_doc}")
    return 1 if any(r.status in ("missing", "check fails") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
