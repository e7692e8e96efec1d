"""ALVTS transformers reference (no vLLM): routing semantics, tiny Qwen2.5-VL and LLaVA-1.5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts import AlvtsOptions, num_processed
from vllm_tokenprune.alvts.reference import decoder_layers, routed, router_for
from vllm_tokenprune.testing.media import make_image

OPTS = AlvtsOptions(first_layer=1, rank=8, consistency=0.25)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def hf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_tokenprune.testing.tiny_model import build_llava, build_qwen2_5_vl

    build = build_qwen2_5_vl if request.param == "qwen2_5_vl" else build_llava
    d = build(tmp_path_factory.mktemp("alvts") / request.param, seed=0, text_layers=3)
    proc = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    size = (224, 168) if request.param == "qwen2_5_vl" else (112, 112)
    images = [make_image(*size, seed=1), make_image(*size, seed=2)]
    content = [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
               {"type": "text", "text": "these two."}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                      add_generation_prompt=True)
    inputs = proc(text=[prompt], images=images, return_tensors="pt")
    return {"dir": Path(d), "model": model, "inputs": inputs}


def _logprobs(model: Any, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0, -1].log_softmax(-1)


def test_ratio_zero_is_the_plain_model(hf: dict[str, Any]) -> None:
    model, inputs = hf["model"], hf["inputs"]
    plain = _logprobs(model, inputs)
    with routed(model, inputs["input_ids"], 0.0, OPTS) as log:
        got = _logprobs(model, inputs)
    assert torch.equal(got, plain)
    assert len(log.spans) == 2 and log.skipped_token_layers() == 0
    assert sorted(log.processed) == [1, 2]


def test_skipped_tokens_pass_through_and_routed_tokens_are_the_selectors(
        hf: dict[str, Any]) -> None:
    model, inputs = hf["model"], hf["inputs"]
    layers = decoder_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    with routed(model, inputs["input_ids"], [0.5, 0.89], OPTS) as log:
        for i, layer in enumerate(layers):  # registered after routing's hooks: see its output
            def hook(_m: Any, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                seen[i] = (x[0].clone(), (out[0] if isinstance(out, tuple) else out)[0].clone())
            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
        routed_lp = _logprobs(model, inputs)
    for h in hooks:
        h.remove()
    assert not torch.equal(routed_lp, _logprobs(model, inputs))  # routing changes the answer
    router = router_for(model, OPTS)
    states = [router.new_state() for _ in log.spans]
    expected_skips = 0
    for layer in (1, 2):
        x, y = seen[layer]
        for item, ((s, e), ratio) in enumerate(zip(log.spans, [0.5, 0.89], strict=True)):
            k = num_processed(e - s, ratio)
            proc = log.processed[layer][item]
            assert len(proc) == k and torch.equal(proc, proc.sort().values)
            # the same selector on the hidden states that entered the layer
            assert torch.equal(router.route(layer, x[s:e], k, states[item]), proc)
            skip = torch.ones(e - s, dtype=torch.bool)
            skip[proc] = False
            assert torch.equal(y[s:e][skip], x[s:e][skip])  # residual stream passes through
            assert not torch.equal(y[s:e][~skip], x[s:e][~skip])
            expected_skips += int(skip.sum())
    assert log.skipped_token_layers() == expected_skips
    # layer 0 (before first_layer) processes every token
    assert 0 not in log.processed


def test_routed_tokens_attend_to_skipped_keys(hf: dict[str, Any]) -> None:
    """A routed token's output equals the unmodified layer's output on the same input: every
    token's K/V at the layer come from the hidden state it entered with."""
    model, inputs = hf["model"], hf["inputs"]
    layer2 = decoder_layers(model)[2]
    captured: dict[str, Any] = {}

    def grab(_m: Any, args: tuple, kwargs: dict, out: Any) -> None:
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).clone()
        captured["kwargs"] = kwargs
        captured["y"] = (out[0] if isinstance(out, tuple) else out).clone()

    with routed(model, inputs["input_ids"], 0.75, OPTS) as log:
        h = layer2.register_forward_hook(grab, with_kwargs=True)
        _logprobs(model, inputs)
        h.remove()
    with torch.no_grad():
        full = layer2(captured["x"], **{k: v for k, v in captured["kwargs"].items()
                                        if k != "hidden_states"})
    full = full[0] if isinstance(full, tuple) else full
    for (s, _e), proc in zip(log.spans, log.processed[2], strict=True):
        rows = proc + s
        torch.testing.assert_close(captured["y"][0, rows], full[0, rows], rtol=0, atol=0)
    text = torch.ones(captured["x"].shape[1], dtype=torch.bool)
    for s, e in log.spans:
        text[s:e] = False
    assert torch.equal(captured["y"][0, text], full[0, text])


def test_decode_steps_are_not_routed(hf: dict[str, Any]) -> None:
    model, inputs = hf["model"], hf["inputs"]
    with routed(model, inputs["input_ids"], 0.5, OPTS) as log, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert sorted(log.processed) == [1, 2]


def test_bad_ratio_count_refused(hf: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="2 media items"), \
            routed(hf["model"], hf["inputs"]["input_ids"], [0.5], OPTS):
        pass


def test_overlap_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks/alvts_overlap.py --quick`` runs and writes its table between the markers;
    with rank = head_dim and the text's own queries, the selector beats chance at ratio 0.5."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    doc = tmp_path / "alvts.md"
    doc.write_text("intro\n<!-- alvts-overlap:begin -->\nold\n<!-- alvts-overlap:end -->\nend\n")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "alvts_overlap.py"),
                           "--quick", "--cache-dir", str(tmp_path / "models"), "--doc", str(doc)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    assert text.count("| random |") == 2
    for line in text.splitlines():
        if line.startswith("| 32 | 0.0 |"):  # tiny models: head_dim 32
            cells = [float(c) for c in line.strip("|").split("|")[2:]]
            assert cells[4] > 0.5  # text-q vs text @0.5 beats the random 0.5
