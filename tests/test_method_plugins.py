"""Methods as plug-ins: a third-party package registers a method through the entry-point group
``vllm_tokenprune.methods`` and a server serves it per request; wire ids do not depend on what
else is installed; a method a worker lacks stops the server at start-up.

The example package (``examples/method-package``) is built and installed into a directory of its
own, never into the venv (``tests/_method_package.py``); the session's Qwen2.5-VL TokenPrune
server (``tests/conftest.py`` ``tp_server``) runs with that directory on ``PYTHONPATH``, so the
server test here adds no server start.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests._method_package import EXAMPLE_METHOD, install, python_path, second_package
from vllm_tokenprune import list_methods, num_kept, select_tokens
from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.method_table import check_worker_methods, method_table
from vllm_tokenprune.models.wire import METHOD_IDS
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.scoring import _registry, get_method, load_entry_points, wire_id

SHOW = ("import json, vllm_tokenprune as t; from vllm_tokenprune.models.wire import METHOD_IDS; "
        "from vllm_tokenprune.scoring import method_options; "
        "print(json.dumps({'methods': t.list_methods(), 'all': t.list_methods(None), "
        "'ids': dict(METHOD_IDS), 'options': {m: list(method_options(m)) "
        "for m in t.list_methods()}}))")


def _python(code: str, *dirs: Path) -> dict[str, Any]:
    env = {**__import__("os").environ, "PYTHONPATH": python_path(*dirs)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_example_is_not_installed_in_the_test_environment() -> None:
    assert importlib.util.find_spec("tokenprune_example_method") is None
    assert EXAMPLE_METHOD not in list_methods()


@pytest.mark.slow
def test_an_installed_method_is_listed_in_a_plain_session(example_methods_dir: Path) -> None:
    """No vLLM, no plugin call: the first use of the registry loads the entry points."""
    shown = _python(SHOW, example_methods_dir)
    assert EXAMPLE_METHOD in shown["methods"]
    assert shown["options"][EXAMPLE_METHOD] == ["center"]
    assert shown["all"][-1] == "alvts"  # layer-stage methods after the input-side ones


@pytest.mark.slow
def test_a_second_package_changes_no_wire_id(example_methods_dir: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wire ids are hashes of the names: the same with no, one or two method packages
    installed (whatever registers first: the ids do not depend on order)."""
    work = tmp_path_factory.mktemp("second")
    second = install(second_package(work), work / "site", work)
    alone = dict(METHOD_IDS)  # this process: no method package installed
    one = _python(SHOW, example_methods_dir)["ids"]
    both = _python(SHOW, second, example_methods_dir)["ids"]
    for ids in (one, both):
        assert {m: ids[m] for m in alone} == alone
    assert set(both) == {*alone, EXAMPLE_METHOD, "zz_second"}
    assert (both[EXAMPLE_METHOD], both["zz_second"]) == (wire_id(EXAMPLE_METHOD),
                                                         wire_id("zz_second"))
    assert one[EXAMPLE_METHOD] == both[EXAMPLE_METHOD]


def test_a_method_with_the_wire_id_of_another_is_refused(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(_registry, "wire_id", lambda name: get_method("lrcp").wire_id)
    with pytest.raises(ValueError, match="has the wire id of the registered method 'lrcp'"):
        _registry.register_method("clashing")(lambda batch, opts: [])
    assert "clashing" not in _registry._REGISTRY


@pytest.mark.slow
def test_a_broken_entry_point_stops_the_plugin_and_is_skipped_elsewhere(tmp_path: Path) -> None:
    """The plugin (strict) refuses to start naming it; a plain session logs and goes on."""
    dist = tmp_path / "broken_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[vllm_tokenprune.methods]\nbroken = broken_methods_missing:register\n")
    lazy = _python("import json, vllm_tokenprune as t; print(json.dumps(t.list_methods()))",
                   tmp_path)
    assert "lrcp" in lazy  # type: ignore[operator]
    code = ("from vllm_tokenprune.scoring import load_entry_points\n"
            "try:\n    load_entry_points(strict=True)\nexcept RuntimeError as e:\n"
            "    import json; print(json.dumps({'error': str(e)}))\n")
    error = _python(code, tmp_path)["error"]
    assert "broken = broken_methods_missing:register" in error
    assert load_entry_points() == {}  # the test environment installs none


def test_registry_records_the_stage() -> None:
    assert get_method("alvts").stage == "layer" and get_method("lrcp").stage == "input"
    assert "alvts" not in list_methods() and list_methods(None)[-1] == "alvts"
    with pytest.raises(ValueError, match="stage 'layer'"):
        select_tokens(torch.randn(10, 4), 3, "alvts")


def test_a_family_without_a_layer_methods_integration_refuses_it() -> None:
    """Qwen3-VL has no ALVTS mixin: a server enabling ``alvts`` on it stops while the model is
    built, naming the method; the families with the mixin list it."""
    from types import SimpleNamespace

    from vllm_tokenprune._vllm_internals import vllm_release
    from vllm_tokenprune.models.qwen2_5_vl import TokenPruneQwen2_5_VLForConditionalGeneration
    from vllm_tokenprune.models.qwen3_vl import TokenPruneQwen3VLForConditionalGeneration as Q3
    from vllm_tokenprune.patches import apply_patches

    apply_patches(vllm_release())  # the CPU runner check runs first
    config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(token_prune={"method": "alvts"}),
                                     multimodal_config=None),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1), use_v2_model_runner=False)
    with pytest.raises(ValueError, match="enables 'alvts' .* which "
                                         "TokenPruneQwen3VLForConditionalGeneration does not"):
        Q3.__new__(Q3)._tp_pre_init(config)
    assert Q3.tp_layer_methods == frozenset()
    assert TokenPruneQwen2_5_VLForConditionalGeneration.tp_layer_methods == {"alvts"}


def test_a_worker_without_a_method_the_api_server_accepts_refuses_to_start() -> None:
    """The API server publishes its table; a worker lacking a method this server's config lets
    requests pick refuses at start-up (not at the first request)."""
    server = method_table()
    server["mean_distance"] = [wire_id("mean_distance"), "input"]
    server["other_layer"] = [wire_id("other_layer"), "layer"]
    table = json.dumps(server)
    with pytest.raises(RuntimeError, match="'mean_distance' is not installed here"):
        check_worker_methods(TokenPruneConfig(), table)
    # not allowed on this server: nothing to miss (a layer-stage method is enabled only where
    # the block names it, which the worker's own validation of the block checks)
    check_worker_methods(TokenPruneConfig(allowed_methods=("lrcp", "uniform")), table)
    server["lrcp"] = [123, "input"]
    with pytest.raises(RuntimeError, match="'lrcp' has wire id"):
        check_worker_methods(TokenPruneConfig(allowed_methods=("lrcp",)), json.dumps(server))
    check_worker_methods(TokenPruneConfig(), json.dumps(method_table()))  # same install


# --------------------------------------------------------------------------- a real server


@pytest.fixture
def example_registered(example_methods_dir: Path,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example method registered in this process too (for the transformers reference),
    and unregistered afterwards."""
    monkeypatch.syspath_prepend(str(example_methods_dir))
    try:
        module = importlib.import_module("tokenprune_example_method")
        module.register()
        yield
    finally:
        _registry._REGISTRY.pop(EXAMPLE_METHOD, None)
        sys.modules.pop("tokenprune_example_method", None)


@pytest.mark.server
def test_an_installed_method_is_served_per_request(tp_server: Any, tiny_qwen_dir: Path,
                                                   example_registered: None) -> None:
    """``prune_method`` names the package's method: exact token accounting, the method's own
    selection (the server's logprobs are transformers' model fed the tokens the method keeps),
    counted under its name, and no fallback."""
    from tests._hf_reference import reference_logprobs
    from tests._suite import LOGPROB_TOL
    from vllm_tokenprune.testing.media import chat_messages, make_image, qwen_image_tokens

    prompt = "Describe this image."
    images = [make_image(336, 252, seed=5), make_image(224, 280, seed=6)]
    ratio = 0.75

    def chat(**extra: Any) -> Any:
        return tp_server.openai().chat.completions.create(
            model=tp_server.model, messages=chat_messages(images, prompt), max_tokens=1,
            temperature=0.0, logprobs=True, top_logprobs=5, extra_body=extra)

    full = chat(prune_ratio=0.0)
    res = chat(prune_ratio=ratio, prune_method=EXAMPLE_METHOD, return_tokens_as_token_ids=True)
    tokens = [qwen_image_tokens(tiny_qwen_dir, im) for im in images]
    kept = [num_kept(n, ratio) for n in tokens]
    assert res.usage.prompt_tokens == full.usage.prompt_tokens - sum(tokens) + sum(kept)
    field = res.model_extra[FIELD]
    assert field["method"] == EXAMPLE_METHOD
    assert [i["tokens"] for i in field["items"]] == tokens
    assert [i["kept"] for i in field["items"]] == kept

    ref, ref_len = reference_logprobs(tiny_qwen_dir, images, prompt, ratio, EXAMPLE_METHOD)
    assert res.usage.prompt_tokens == ref_len
    for entry in res.choices[0].logprobs.content[0].top_logprobs:
        token_id = int(entry.token.removeprefix("token_id:"))
        assert entry.logprob == pytest.approx(float(ref[token_id]), abs=LOGPROB_TOL), entry.token

    metrics = requests.get(tp_server.base_url + "/metrics", timeout=30).text
    kept_series = [line for line in metrics.splitlines()
                   if line.startswith("tokenprune_kept_visual_tokens_total{")
                   and f'method="{EXAMPLE_METHOD}"' in line]
    assert kept_series and float(kept_series[0].rsplit(" ", 1)[1]) >= sum(kept)
    assert not [line for line in metrics.splitlines()
                if line.startswith("tokenprune_scorer_fallbacks_total{")
                and f'method="{EXAMPLE_METHOD}"' in line]
    config = requests.get(tp_server.base_url + "/v1/tokenprune/config", timeout=30).json()
    assert EXAMPLE_METHOD in config["methods"]
