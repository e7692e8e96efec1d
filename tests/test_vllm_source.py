"""``scripts/check_vllm_source.py``: the inventory checked against a vLLM release by reading its
source (no import, no download here: the installed vLLM is the source), and
``docs/vllm-versions.md`` kept in step with the inventory (no network; seconds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import check_vllm_source as check
from vllm_tokenprune import _vllm_internals as internals

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "vllm-versions.md"


@pytest.fixture(scope="module")
def installed() -> object:
    """The installed vLLM's sources (parsed once for the module's tests)."""
    return check.Tree(check.installed_vllm())


def _tree(installed: object, **edits: tuple[str, str]) -> object:
    """The installed vLLM with ``file: (old, new)`` text replacements applied in memory."""
    overrides = {}
    for rel, (old, new) in ((k.replace("__", "/") + ".py", v) for k, v in edits.items()):
        text = installed.read(rel)
        assert text is not None and old in text, \
            f"{rel} no longer contains {old!r}: update the planted edit"
        overrides[rel] = text.replace(old, new, 1)
    return installed.with_overrides(overrides)


def _by_target(results: list, target: str):
    return [r for r in results if r.target == target]


def test_every_entry_declares_a_known_comparison_and_a_static_check():
    for item in internals.INTERNALS:
        assert item.comparison in internals.COMPARISONS, item
        if item.check is not None:
            assert getattr(item.check, "spec", None), (
                f"{item.target}: its check has no .spec; build it with _uses / _params / "
                "_has_field / _method_params / _subclass_of so scripts/check_vllm_source.py "
                "can check it without importing vLLM")


def test_control_installed_vllm_against_itself_is_identical_and_every_check_passes(installed):
    """The source reading agrees with the import-based checks (tests/test_vllm_internals.py):
    every entry found, every translated check passing, nothing 'needs import'."""
    results = check.run(internals.INTERNALS, installed, installed)
    odd = [(r.target, r.status, r.check, r.note) for r in results
           if r.status != "identical" or r.check != "ok" or r.info
           or "(was" in r.note or "baseline" in r.note]
    assert not odd, odd
    assert len(results) == len(internals.INTERNALS)


def test_planted_changes_are_reported(installed):
    base = installed
    qwen2 = "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.forward"
    sched = "vllm.v1.core.sched.scheduler:Scheduler._try_schedule_encoder_inputs"
    batched = "vllm.multimodal.inputs:MultiModalFieldConfig.batched"
    info = "vllm.model_executor.models.qwen2_vl:Qwen2VLProcessingInfo"
    changed = _tree(
        installed,
        vllm__model_executor__models__qwen2=(
            "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
            "hidden_states, residual = hidden_states + residual, residual"),
        vllm__v1__core__sched__scheduler=(
            "and num_computed_tokens < start_pos\n", "and num_computed_tokens <= start_pos\n"),
        vllm__multimodal__inputs=("def batched(modality: str, *, keep_on_cpu: bool = False)",
                                 "def batched(modality: str, *, keep_on_cpu: bool = True)"),
        vllm__model_executor__models__qwen2_vl=(
            "class Qwen2VLProcessingInfo(", "class Qwen2VLProcessingInfoRenamed("),
        vllm__v1__utils=('name=f"ApiServer_{i}"', 'name=f"APIServer{i}"'),
    )
    results = check.run(internals.INTERNALS, base, changed)
    (layer,) = _by_target(results, qwen2)
    assert layer.status == "check fails" and "post_attention_layernorm" in layer.check
    assert "-" in layer.diff and "post_attention_layernorm" in layer.diff
    for r in _by_target(results, sched):  # two entries: both see the body change
        assert r.status == "changed", r
        assert "+" in r.diff and "num_computed_tokens <= start_pos" in r.diff
    (sig,) = _by_target(results, batched)
    assert sig.status == "changed" and "keep_on_cpu=True" in sig.diff
    (cls,) = _by_target(results, info)
    assert cls.status == "missing"
    scheduler_cls = _by_target(results, "vllm.v1.core.sched.scheduler:Scheduler")[0]
    assert scheduler_cls.status == "identical" and scheduler_cls.info  # members same, body not
    # the class entry of the edited method's class sees the edit too
    (field_cls,) = _by_target(results, "vllm.multimodal.inputs:MultiModalFieldConfig")
    assert field_cls.status == "changed", field_cls
    # a literal the plugin relies on (the API server processes' name)
    (api,) = _by_target(results, "vllm.v1.utils:APIServerProcessManager")
    assert api.status == "check fails" and "ApiServer_" in api.check, api
    untouched = [r for r in results if r.target not in (
        qwen2, sched, batched, info, "vllm.v1.core.sched.scheduler:Scheduler",
        "vllm.multimodal.inputs:MultiModalFieldConfig", api.target)]
    assert {r.status for r in untouched} == {"identical"}, [
        (r.target, r.status) for r in untouched if r.status != "identical"]


def test_docstrings_comments_and_formatting_are_not_changes(installed):
    base = installed
    reformatted = _tree(
        installed,
        vllm__model_executor__models__qwen2=(
            "hidden_states = self.self_attn(",
            "# a comment\n        hidden_states = self.self_attn(  # another\n"),
        vllm__v1__core__sched__scheduler=(
            '"""Determine which encoder inputs', '"""Reworded: determine which encoder inputs'),
    )
    results = check.run(internals.INTERNALS, base, reformatted)
    assert {r.status for r in results} == {"identical"}


def _section(version: str) -> str:
    text = DOC.read_text()
    begin = f"<!-- check_vllm_source: begin {version} -->"
    end = f"<!-- check_vllm_source: end {version} -->"
    assert begin in text and end in text, f"docs/vllm-versions.md has no {version} section"
    return text.split(begin, 1)[1].split(end, 1)[0]


def checked_version() -> str:
    """The vLLM release the GPU image builds on (docker/Dockerfile's VLLM_VERSION)."""
    m = re.search(r"^ARG VLLM_VERSION=v(\d+\.\d+\.\d+)$",
                  (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert m, "docker/Dockerfile: no ARG VLLM_VERSION=vX.Y.Z"
    return m.group(1)


def test_doc_checks_every_inventory_entry_against_the_gpu_image_version():
    """A new or changed entry needs a fresh run against the release the GPU image uses, and
    every entry that is not identical there needs a verdict in the doc."""
    version = checked_version()
    rerun = (f"run `python scripts/check_vllm_source.py --version {version} --write-doc "
             "docs/vllm-versions.md` and give each non-identical entry a verdict")
    rows = re.findall(r"^\| \d+ \| `([^`]+)` \| ([^|]+?) \| ([^|]+?) \|", _section(version),
                      re.M)
    assert len(rows) == len(internals.INTERNALS), f"{len(rows)} rows for "\
        f"{len(internals.INTERNALS)} entries: {rerun}"
    table = {(t, c) for t, c, _ in rows}
    stale = [(i.target, check.contract_text(i)) for i in internals.INTERNALS
             if (i.target, check.contract_text(i)) not in table]
    assert not stale, f"not checked against {version}: {stale}; {rerun}"
    verdicts = DOC.read_text().split(f"<!-- check_vllm_source: end {version} -->", 1)[1]
    verdicts = verdicts.split("<!-- check_vllm_source: begin", 1)[0]
    missing = sorted({t for t, _, result in rows
                      if result.strip() != "identical" and f"`{t}`" not in verdicts})
    assert not missing, (f"docs/vllm-versions.md: no verdict after the {version} table for "
                         f"{missing}")
    assert not any(r.strip().startswith(("missing", "check fails")) for _, _, r in rows)


def test_control_section_says_every_entry_is_identical():
    control = _section("0.32.0")
    assert f"{len(internals.INTERNALS)} inventory entries: " \
        f"{len(internals.INTERNALS)} identical." in control
