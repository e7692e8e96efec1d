"""The serving benchmark's presets have the proportions their labels claim (MAC counts from the
configs, ``benchmarks/model_flops.py``), and the op counter counts something."""

from __future__ import annotations

import pytest

from benchmarks import model_flops as mf


@pytest.mark.parametrize("n", [588, 2880])
def test_vl7b_preset_has_qwen2_5_vl_7b_vision_to_lm_ratio(n):
    from benchmarks.serving.run import PRESETS

    real = mf.ratio(mf.QWEN2_5_VL_7B, n)[2]
    preset = mf.ratio(mf.preset_config(PRESETS["vl7b"][0]), n)[2]
    lm_bound = mf.ratio(mf.preset_config(PRESETS["mid"][0]), n)[2]
    assert 0.35 < real < 0.5  # the tower costs ~40% of the LM per visual token
    assert abs(preset / real - 1) < 0.03
    assert lm_bound < 0.15 * real


def test_7b_counts_match_hand_count():
    # LM per token: 28 x (2 h^2 + 2 h 512 + 3 h 18944) + attention; tower linear part per patch:
    # 32 x (4 h^2 + 3 h 3420) with h = 1280.
    lm_linear = 28 * (2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert mf.lm_macs_per_token(mf.QWEN2_5_VL_7B["text_config"], 0) == lm_linear
    vis = mf.vision_macs_per_lm_token(mf.QWEN2_5_VL_7B["vision_config"], 588)
    assert 4 * 32 * (4 * 1280**2 + 3 * 1280 * 3420) < vis < 1.1 * 4 * 32 * (
        4 * 1280**2 + 3 * 1280 * 3420) + 50e6


def test_count_ops_counts_greedy_steps():
    from benchmarks import count_ops

    total, launching, _ = count_ops.per_step("divprune", n=64, d=8, k=16, batch=1)
    assert 3 <= launching <= total <= 30
