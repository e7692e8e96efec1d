"""Patches the plugin applies to vLLM itself (shared: applied at plugin time in every process;
each acts in the process that imports what it patches), after vllm-ascend's ``patch/``.

Each patch is one module here whose docstring says what it patches, why, and until when; each
is version-gated and applied only where the installed vLLM lacks what it adds (detected from the
code, as :mod:`vllm_tokenprune._vllm_internals` checks every internal), and every vLLM internal
it touches is in :data:`vllm_tokenprune._vllm_internals.INTERNALS`. A patch of a module not yet
imported is applied when that module is imported (an import hook), so processes that never
import it pay nothing.

``VLLM_TOKENPRUNE_DISABLE_PATCHES=<name>[,<name>...]`` (or ``all``) leaves patches out; the
start-up checks then refuse what the patch would have fixed.

===================  =====================================================================
patch                what
===================  =====================================================================
``cpu_model_runner`` vLLM 0.32/0.33 CPU runner: enable the multimodal pruning switch
                     (:mod:`.cpu_model_runner`)
===================  =====================================================================
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vllm_tokenprune.log import init_logger
from vllm_tokenprune.patches import cpu_model_runner

DISABLE_ENV = "VLLM_TOKENPRUNE_DISABLE_PATCHES"


@dataclass(frozen=True)
class Patch:
    """One patch: ``module`` is patched by ``apply(module)`` when ``needed(module)``; both get
    the imported module. ``versions``: the vLLM releases ``[min, max)`` it is for."""

    name: str
    module: str
    versions: tuple[tuple[int, ...], tuple[int, ...]]
    needed: Callable[[ModuleType], bool]
    apply: Callable[[ModuleType], None]


PATCHES: tuple[Patch, ...] = (
    Patch(cpu_model_runner.NAME, cpu_model_runner.MODULE, cpu_model_runner.VERSIONS,
          cpu_model_runner.needed, cpu_model_runner.apply),
)

_lock = threading.Lock()
#: name -> what happened: "applied", "not needed", "disabled", "other vLLM version", "pending".
STATE: dict[str, str] = {}


def disabled() -> set[str]:
    value = os.environ.get(DISABLE_ENV, "")
    return {p.strip() for p in value.split(",") if p.strip()}


def _run(patch: Patch, module: ModuleType) -> None:
    with _lock:
        if STATE.get(patch.name) in ("applied", "not needed"):
            return
        if patch.needed(module):
            patch.apply(module)
            STATE[patch.name] = "applied"
            init_logger(__name__).info("vllm-tokenprune: patched %s (vllm_tokenprune/patches/"
                                       "%s.py)", patch.module, patch.name)
        else:
            STATE[patch.name] = "not needed"


def apply_patches(version: tuple[int, ...]) -> dict[str, str]:
    """Apply every patch meant for vLLM release ``version`` (now, or when its module is
    imported). Returns :data:`STATE`."""
    off = disabled()
    for patch in PATCHES:
        if patch.name in off or "all" in off:
            STATE[patch.name] = "disabled"
            continue
        low, high = patch.versions
        if not low <= version < high:
            STATE[patch.name] = "other vLLM version"
            continue
        module = sys.modules.get(patch.module)
        if module is not None:
            _run(patch, module)
        else:
            STATE.setdefault(patch.name, "pending")
            _install_hook()
    return dict(STATE)


class _AfterImport(importlib.abc.Loader):
    """Runs the module's own loader, then the patches waiting for it."""

    def __init__(self, loader: Any, patches: list[Patch]) -> None:
        self._loader = loader
        self._patches = patches

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for patch in self._patches:
            _run(patch, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a module a pending patch waits for."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        waiting = [p for p in PATCHES if p.module == fullname and STATE.get(p.name) == "pending"]
        if not waiting:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterImport(spec.loader, waiting)
        return spec


def _install_hook() -> None:
    with _lock:
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
