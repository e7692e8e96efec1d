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
import copy
import difflib
import importlib.util
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "vllm-tokenprune" / "wheels"
DIFF_LINES = 40


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


# ------------------------------------------------------------------------------ source trees


class Tree:
    """A vLLM release's Python sources: a directory holding ``vllm/``, a wheel or an sdist."""

    def __init__(self, path: Path, overrides: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.overrides = dict(overrides or {})
        self._zip: zipfile.ZipFile | None = None
        self._tar: dict[str, bytes] | None = None
        self._dir: Path | None = None
        self._parsed: dict[str, ast.Module | None] = {}
        p = self.path
        if p.is_dir():
            self._dir = p.parent if p.name == "vllm" and (p / "__init__.py").exists() else p
            if not (self._dir / "vllm" / "__init__.py").exists():
                raise FileNotFoundError(f"{p}: no vllm/__init__.py")
        elif p.suffix == ".whl":
            self._zip = zipfile.ZipFile(p)
        elif p.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(p) as tar:
                self._tar = {}
                for m in tar.getmembers():
                    parts = m.name.split("/", 1)
                    if m.isfile() and len(parts) == 2 and parts[1].startswith("vllm/") \
                            and parts[1].endswith(".py"):
                        f = tar.extractfile(m)
                        assert f is not None
                        self._tar[parts[1]] = f.read()
        else:
            raise ValueError(f"{p}: not a directory, wheel or sdist")
        self.version = self._version()

    def with_overrides(self, overrides: dict[str, str]) -> Tree:
        """This tree with some files' text replaced (tests plant changes this way); modules
        already parsed are shared."""
        tree = Tree(self.path, {**self.overrides, **overrides})
        tree._parsed = {m: t for m, t in self._parsed.items()
                        if self.module_file(m) not in overrides}
        return tree

    def read(self, rel: str) -> str | None:
        if rel in self.overrides:
            return self.overrides[rel]
        if self._dir is not None:
            f = self._dir / rel
            return f.read_text() if f.is_file() else None
        if self._zip is not None:
            try:
                return self._zip.read(rel).decode()
            except KeyError:
                return None
        assert self._tar is not None
        data = self._tar.get(rel)
        return None if data is None else data.decode()

    def _version(self) -> str:
        text = self.read("vllm/_version.py") or ""
        m = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text)
        if m:
            return m.group(1)
        m = re.search(r"vllm-(\d[^-/]*?)(?:\.tar\.gz|-)", self.path.name)
        return m.group(1) if m else "unknown"

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for rel in (f"{base}.py", f"{base}/__init__.py"):
            if self.read(rel) is not None:
                return rel
        return None

    def parse(self, module: str) -> ast.Module | None:
        if module not in self._parsed:
            rel = self.module_file(module)
            text = None if rel is None else self.read(rel)
            self._parsed[module] = None if text is None else ast.parse(text)
        return self._parsed[module]

    def is_package(self, module: str) -> bool:
        return (self.module_file(module) or "").endswith("/__init__.py")


# ------------------------------------------------------------------------------- resolution


@dataclass
class Def:
    """A definition found in a tree: ``node`` is a ClassDef, FunctionDef, Assign, AnnAssign
    or Module; ``where`` is ``module:Qual.name`` where it is written."""

    module: str
    qual: str
    node: ast.AST

    @property
    def where(self) -> str:
        return f"{self.module}:{self.qual}" if self.qual else self.module


@dataclass
class NotFound:
    reason: str
    #: True when the answer depends on code outside vLLM (a base class such as nn.Module):
    #: only importing can tell.
    needs_import: bool = False


Found = Def | NotFound
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _stmts(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a module or class body, descending into if/try/with blocks."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _stmts(stmt.body)
            yield from _stmts(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _stmts(stmt.body)
            for h in stmt.handlers:
                yield from _stmts(h.body)
            yield from _stmts(stmt.orelse)
            yield from _stmts(stmt.finalbody)
        elif isinstance(stmt, ast.With):
            yield from _stmts(stmt.body)


def _assigns(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.target.id == name
    return False


class Resolver:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self.tree.is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def global_(self, module: str, name: str, depth: int = 0) -> Found:
        """``module.name`` as Python would find it (definitions first, then imports)."""
        if not module.startswith("vllm"):
            return NotFound(f"{module} is outside vLLM", needs_import=True)
        tree = self.tree.parse(module)
        if tree is None:
            return NotFound(f"no module {module}")
        if depth > 20:
            return NotFound(f"import cycle at {module}:{name}", needs_import=True)
        imports: list[tuple[str, str]] = []
        assigns: list[ast.stmt] = []
        stars: list[str] = []
        for stmt in _stmts(tree.body):
            if isinstance(stmt, (ast.ClassDef, *FUNCS)) and stmt.name == name:
                return Def(module, name, stmt)
            if _assigns(stmt, name):
                assigns.append(stmt)
            elif isinstance(stmt, ast.ImportFrom):
                source = self._absolute(module, stmt)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        imports.append((source, alias.name))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        if self.tree.parse(alias.name) is not None:
                            return Def(alias.name, "", self.tree.parse(alias.name))  # type: ignore[arg-type]
        for source, attr in imports:
            found = self.global_(source, attr, depth + 1)
            if isinstance(found, Def):
                return found
            sub = f"{source}.{attr}"
            if self.tree.parse(sub) is not None:
                return Def(sub, "", self.tree.parse(sub))  # type: ignore[arg-type]
            if found.needs_import:
                return found
        if assigns:
            return Def(module, name, assigns[-1])
        for source in stars:
            found = self.global_(source, name, depth + 1)
            if isinstance(found, Def):
                return found
        sub = f"{module}.{name}"
        if self.tree.parse(sub) is not None:
            return Def(sub, "", self.tree.parse(sub))  # type: ignore[arg-type]
        return NotFound(f"{module} has no {name}")

    def expr(self, module: str, node: ast.expr) -> Found:
        """A class named by an expression in ``module`` (a base class, a call's function)."""
        if isinstance(node, ast.Subscript):  # Generic[T], Base[T]
            return self.expr(module, node.value)
        if isinstance(node, ast.Name):
            return self.global_(module, node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expr(module, node.value)
            if isinstance(owner, Def) and isinstance(owner.node, ast.Module):
                return self.global_(owner.module, node.attr)
            if isinstance(owner, Def) and isinstance(owner.node, ast.ClassDef):
                return self.member(owner, node.attr)
            return NotFound(f"{ast.unparse(node)} is outside vLLM", needs_import=True)
        return NotFound(f"{ast.unparse(node)}: not statically resolvable", needs_import=True)

    def bases(self, cls: Def) -> tuple[list[Def], list[str]]:
        """vLLM base classes of ``cls`` (direct) and the names of those outside vLLM."""
        assert isinstance(cls.node, ast.ClassDef)
        found, outside = [], []
        for base in cls.node.bases:
            b = self.expr(cls.module, base)
            if isinstance(b, Def) and isinstance(b.node, ast.ClassDef):
                found.append(b)
            elif ast.unparse(base) not in ("object",):
                outside.append(ast.unparse(base))
        return found, outside

    def member(self, cls: Def, name: str, instance: bool = False, depth: int = 0) -> Found:
        """``cls.name`` through vLLM base classes (``instance``: also ``self.name = ...`` in
        ``__init__``)."""
        assert isinstance(cls.node, ast.ClassDef)
        for stmt in _stmts(cls.node.body):
            if isinstance(stmt, (*FUNCS, ast.ClassDef)) and stmt.name == name:
                return Def(cls.module, f"{cls.qual}.{name}", stmt)
            if _assigns(stmt, name):
                return Def(cls.module, f"{cls.qual}.{name}", stmt)
        if instance:
            init = next((s for s in cls.node.body if isinstance(s, FUNCS)
                         and s.name == "__init__"), None)
            for node in ast.walk(init) if init is not None else ():
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Attribute) and t.attr == name
                           and isinstance(t.value, ast.Name) and t.value.id == "self"
                           for t in targets):
                        return Def(cls.module, f"{cls.qual}.__init__:self.{name}", node)
        bases, outside = self.bases(cls)
        for base in bases:
            if depth < 30:
                found = self.member(base, name, instance, depth + 1)
                if isinstance(found, Def):
                    return found
        if outside:
            return NotFound(f"{cls.qual} has no {name} in vLLM code (bases outside vLLM: "
                            f"{', '.join(outside)})", needs_import=True)
        return NotFound(f"{cls.qual} has no {name}")

    def instance_class(self, obj: Def) -> Found:
        """The class of a module-level ``X = SomeClass(...)``."""
        value = getattr(obj.node, "value", None)
        if isinstance(value, ast.Call):
            cls = self.expr(obj.module, value.func)
            if isinstance(cls, Def) and isinstance(cls.node, ast.ClassDef):
                return cls
        return NotFound(f"{obj.where} is not a vLLM class instance", needs_import=True)

    def attr(self, owner: Def, name: str) -> Found:
        if isinstance(owner.node, ast.Module):
            return self.global_(owner.module, name)
        if isinstance(owner.node, ast.ClassDef):
            return self.member(owner, name)
        if isinstance(owner.node, (ast.Assign, ast.AnnAssign)):
            cls = self.instance_class(owner)
            return self.member(cls, name, instance=True) if isinstance(cls, Def) else cls
        return NotFound(f"{owner.where} has no attribute {name} in its source",
                        needs_import=True)

    def target(self, target: str) -> Found:
        module, _, qual = target.partition(":")
        tree = self.tree.parse(module)
        if tree is None:
            return NotFound(f"no module {module}")
        found: Found = Def(module, "", tree)
        for part in qual.split(".") if qual else ():
            if not isinstance(found, Def):
                break
            found = self.attr(found, part)
        return found

    def is_subclass(self, cls: Def, target: Def, depth: int = 0) -> bool | None:
        if (cls.module, cls.qual) == (target.module, target.qual):
            return True
        bases, outside = self.bases(cls)
        answers = [self.is_subclass(b, target, depth + 1) for b in bases] if depth < 30 else []
        if any(a is True for a in answers):
            return True
        return None if outside or any(a is None for a in answers) else False


# ------------------------------------------------------------------------------ comparisons


def signature(fn: ast.AST) -> str:
    """``(a, b=1, *args, c, **kw)``: names, kinds and defaults (annotations left out)."""
    assert isinstance(fn, FUNCS)
    a = fn.args
    parts: list[str] = []
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        parts.append(arg.arg + ("" if default is None else "=" + ast.unparse(default)))
        if a.posonlyargs and i == len(a.posonlyargs) - 1:
            parts.append("/")
    if a.vararg:
        parts.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        parts.append("*")
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        parts.append(arg.arg + ("" if default is None else "=" + ast.unparse(default)))
    if a.kwarg:
        parts.append("**" + a.kwarg.arg)
    return f"({', '.join(parts)})"


def param_names(fn: ast.AST) -> list[str]:
    assert isinstance(fn, FUNCS)
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    names += [a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return names


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def normalised(node: ast.AST) -> ast.AST:
    return ast.fix_missing_locations(_StripDocstrings().visit(copy.deepcopy(node)))


def code_of(node: ast.AST) -> str:
    """Source of a definition without docstrings, comments or formatting."""
    return ast.unparse(normalised(node))


def short_diff(old: str, new: str, limit: int = DIFF_LINES) -> str:
    lines = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(),
                                                   "0.old", "0.new", n=1, lineterm="")
             if not line.startswith(("---", "+++"))]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


def class_members(r: Resolver, cls: Def) -> dict[str, str]:
    """Member name -> its declaration (method signature, field annotation and default)."""
    assert isinstance(cls.node, ast.ClassDef)
    out = {"(bases)": ", ".join(ast.unparse(b) for b in cls.node.bases)}
    for stmt in _stmts(cls.node.body):
        if isinstance(stmt, FUNCS):
            deco = "".join(f"@{ast.unparse(d)} " for d in stmt.decorator_list)
            out.setdefault(stmt.name, deco + "def " + signature(stmt))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = ast.unparse(normalised(stmt))
        elif isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = ast.unparse(normalised(stmt))
        elif isinstance(stmt, ast.ClassDef):
            out[stmt.name] = "class"
    return out


def method_bodies(cls: Def) -> dict[str, str]:
    assert isinstance(cls.node, ast.ClassDef)
    return {s.name: code_of(s) for s in _stmts(cls.node.body) if isinstance(s, FUNCS)}


# ------------------------------------------------------------------------- static checks


def function_def(r: Resolver, d: Def) -> Found:
    """The function a definition stands for (a class: its ``__init__``)."""
    if isinstance(d.node, FUNCS):
        return d
    if isinstance(d.node, ast.ClassDef):
        init = r.member(d, "__init__")
        if isinstance(init, Def) and isinstance(init.node, FUNCS):
            return init
        return NotFound(f"{d.qual}: no __init__ in vLLM code", needs_import=True)
    return NotFound(f"{d.where} is not a function in source", needs_import=True)


def names_used(fn: ast.AST) -> set[str]:
    """What ``co_names`` would hold, from source: names, attributes and imported names."""
    names: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def static_check(r: Resolver, d: Def, spec: tuple[Any, ...] | None) -> str:
    """``ok``, a problem, or ``needs import: ...`` for an entry's ``check.spec``."""
    if spec is None:
        return "ok"
    op, args = spec
    if op == "uses":
        fn = function_def(r, d)
        if isinstance(fn, NotFound):
            return f"needs import: {fn.reason}"
        missing = [n for n in args if n not in names_used(fn.node)]
        return f"no longer uses {', '.join(missing)}" if missing else "ok"
    if op in ("params", "method_params"):
        if op == "method_params":
            meth = r.member(d, args[0]) if isinstance(d.node, ast.ClassDef) else \
                NotFound(f"{d.where} is not a class")
            if isinstance(meth, NotFound):
                return ("needs import: " if meth.needs_import else "") + meth.reason
            d, args = meth, args[1:]
        fn = function_def(r, d)
        if isinstance(fn, NotFound):
            return f"needs import: {fn.reason}"
        got = param_names(fn.node)
        missing = [n for n in args if n not in got]
        return f"signature {got} lacks {missing}" if missing else "ok"
    if op == "has":
        problems, unknown = [], []
        for name in args:
            found = r.attr(d, name)
            if isinstance(found, NotFound):
                (unknown if found.needs_import else problems).append(name)
        if problems:
            return f"lacks {problems}"
        return f"needs import: {unknown} not found in vLLM code" if unknown else "ok"
    if op == "subclass_of":
        base = r.target(args[0])
        if isinstance(base, NotFound) or not isinstance(d.node, ast.ClassDef):
            return f"needs import: cannot resolve {args[0]}"
        answer = r.is_subclass(d, base)
        if answer is None:
            return f"needs import: bases outside vLLM between it and {args[0]}"
        return "ok" if answer else f"not a subclass of {args[0]}"
    return f"needs import: no static form of check {op!r}"


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
