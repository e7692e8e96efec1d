"""The package's import graph: every module runs in one declared process, says so in its
docstring, and imports only modules of its own layer or below; no cycles; no worker module
imports an API-server module (or the reverse). Reads the sources (``ast``), imports nothing.

Processes, lowest layer first (the one place they are declared: :data:`PROCESS`):

* ``pure``: no vLLM, any process or Python session (the scorers, the registry, ALVTS's
  selector);
* ``shared``: every vLLM process (the plugin entry point, config, the wire format, what the
  processes exchange, vLLM internals and patches);
* ``api`` (API server: the processor, the plan, the request bridge, the response field, the
  request metrics), ``worker`` (the model's hooks, the encoder budget, fallbacks, the worker's
  metrics, ALVTS's model side), ``engine`` (engine core: the WholeMedia schedulers);
* ``family``: the ``TokenPrune<Arch>`` modules, which bind a processor (API server) and a model
  (worker) to vLLM's classes;
* ``tool``: tests, benchmarks and the preview (not loaded by a server).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_tokenprune"

#: Module (or package prefix, longest match wins) -> process.
PROCESS: dict[str, str] = {
    "vllm_tokenprune": "pure",  # the public API: the scorers and the registry
    "vllm_tokenprune.log": "pure",
    "vllm_tokenprune.scoring": "pure",
    "vllm_tokenprune.alvts": "pure",
    "vllm_tokenprune.alvts.selector": "pure",
    "vllm_tokenprune.alvts.reference": "pure",
    "vllm_tokenprune._vllm_internals": "shared",
    "vllm_tokenprune.config": "shared",
    "vllm_tokenprune.runtime": "shared",
    "vllm_tokenprune.models.wire": "shared",
    "vllm_tokenprune.method_table": "shared",
    "vllm_tokenprune.metrics": "shared",
    "vllm_tokenprune.metrics.exchange": "shared",
    "vllm_tokenprune.patches": "shared",
    "vllm_tokenprune.plugin": "shared",
    "vllm_tokenprune.plan": "api",
    "vllm_tokenprune.cache_keys": "api",
    "vllm_tokenprune.response": "api",
    "vllm_tokenprune.features": "api",
    "vllm_tokenprune.serving": "api",
    "vllm_tokenprune.metrics.frontend": "api",
    "vllm_tokenprune.budget": "api",
    "vllm_tokenprune.models.processor": "api",
    "vllm_tokenprune.models.model_hooks": "worker",
    "vllm_tokenprune.models.encoder_budget": "worker",
    "vllm_tokenprune.models.staging": "worker",
    "vllm_tokenprune.models.fallbacks": "worker",
    "vllm_tokenprune.models.faults": "worker",
    "vllm_tokenprune.models.positions": "worker",
    "vllm_tokenprune.models.mrope": "worker",
    "vllm_tokenprune.metrics.worker": "worker",
    "vllm_tokenprune.alvts.model": "worker",
    "vllm_tokenprune.alvts.compiled": "worker",
    "vllm_tokenprune.alvts.quant": "worker",
    "vllm_tokenprune.alvts.scheduler": "engine",
    "vllm_tokenprune.models": "family",
    "vllm_tokenprune.preview": "tool",
    "vllm_tokenprune.demo": "tool",
    "vllm_tokenprune.testing": "tool",
}
LAYER = {"pure": 0, "shared": 1, "api": 2, "worker": 2, "engine": 2, "family": 3, "tool": 4}
#: Processes whose modules must not import each other's.
APART = {("worker", "api"), ("engine", "api"), ("api", "worker"), ("api", "engine")}
#: What a module's docstring says about where it runs, per process (one of them).
SAYS = {
    "pure": ("no vLLM", "pure torch", "pure Python", "outside vLLM"),
    "shared": ("every process", "shared"),
    "api": ("API server",),
    "worker": ("worker",),
    "engine": ("engine core",),
    "family": ("family module",),
    "tool": ("not used by the plugin", "tests", "offline", "outside a server"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def process(module: str) -> str:
    best = max((p for p in PROCESS if module == p or module.startswith(p + ".")), key=len)
    return PROCESS[best]


def imports(module: str) -> set[str]:
    """The package's modules ``module`` imports (at module level and inside functions)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c of a module a.b: a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_declared_process() -> None:
    assert set(LAYER) == set(SAYS)
    assert all(process(m) in LAYER for m in MODULES)


def test_every_module_says_where_it_runs() -> None:
    missing = []
    for module, path in MODULES.items():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").replace("\n", " ")
        if not any(phrase in doc for phrase in SAYS[process(module)]):
            missing.append(f"{module} ({process(module)}): {SAYS[process(module)]}")
    assert not missing, "docstrings that do not say where the module runs:\n" + "\n".join(
        missing)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph.get(m, ()):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a module of a higher layer, or across processes that must stay apart."""
    bad = []
    for m, targets in graph.items():
        for n in sorted(targets):
            pm, pn = process(m), process(n)
            if LAYER[pn] > LAYER[pm]:
                bad.append(f"{m} ({pm}) imports {n} ({pn}): a layer above")
            elif (pm, pn) in APART:
                bad.append(f"{m} ({pm}) imports {n} ({pn}): another process")
    return bad


def test_no_import_cycles() -> None:
    assert not cycles(GRAPH)


def test_no_module_imports_from_a_layer_above_or_across_processes() -> None:
    bad = violations(GRAPH)
    assert not bad, "\n".join(bad)


def test_the_checks_see_planted_defects() -> None:
    """A worker module importing an API-server one, a shared module importing a worker one,
    and a cycle, each planted in a copy of the graph, are reported."""
    fallbacks, processor = "vllm_tokenprune.models.fallbacks", "vllm_tokenprune.models.processor"
    across = {**GRAPH, fallbacks: {*GRAPH[fallbacks], processor}}
    assert violations(across) == [f"{fallbacks} (worker) imports {processor} (api): another "
                                  "process"]
    config, hooks = "vllm_tokenprune.config", "vllm_tokenprune.models.model_hooks"
    upward = {**GRAPH, config: {*GRAPH[config], hooks}}
    assert violations(upward) == [f"{config} (shared) imports {hooks} (worker): a layer above"]
    assert cycles(upward) and all(hooks in c and config in c for c in cycles(upward))


def test_the_readme_map_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## How it works"):]
    section = section[: section.index("\n## ", 4)]
    missing = [m for m in MODULES if process(m) != "tool"
               and m.removeprefix("vllm_tokenprune.").replace(".", "/") not in section]
    assert not missing, f"README's 'How it works' does not name: {missing}"
