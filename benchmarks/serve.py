"""The serving benchmark's presets under their old module name, for the ALVTS studies that
``import serve`` (``alvts_overlap.py``, ``alvts_selector.py``). The benchmark itself:
``python -m benchmarks.serving`` (:mod:`benchmarks.serving`)."""

from benchmarks.serving.run import _MID_LM, PRESETS, PROMPT, ensure_model

__all__ = ["PRESETS", "PROMPT", "_MID_LM", "ensure_model"]
