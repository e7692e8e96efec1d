"""Reading a vLLM release's Python sources with :mod:`ast`, nothing imported (used by
``scripts/check_vllm_source.py``): :class:`Tree` (a directory, wheel or sdist), :class:`Resolver`
(finds ``module:Qual.name`` the way Python would, through imports and vLLM base classes),
signatures, normalised code, and the inventory checks (``check.spec``) evaluated on source."""

from __future__ import annotations

import ast
import copy
import difflib
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIFF_LINES = 40


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
    if op == "source_has":
        fn = function_def(r, d)
        if isinstance(fn, NotFound):
            return f"needs import: {fn.reason}"
        source = ast.unparse(fn.node)
        missing = [t for t in args if t not in source]
        return f"source lacks {missing}" if missing else "ok"
    return f"needs import: no static form of check {op!r}"
