"""ALVTS transformers reference (no vLLM): routing semantics, tiny Qwen2.5-VL and LLaVA-1.5."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts import AlvtsOptions, num_processed
from vllm_tokenprune.alvts.reference import decoder_layers, routed, router_for
from vllm_tokenprune.testing.media import make_image

#: queries 16 < the items' 48-64 tokens: the strided query path runs in the hooks too
OPTS = AlvtsOptions(first_layer=1, rank=8, consistency=0.25, queries=16)


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
    # ratio 0 hands every layer's own output on unchanged; two CPU forwards of the same model
    # are not always bit-identical (one full-suite run differed in the last bits on
    # Qwen2.5-VL), so within float32 rounding, far below any routing's effect (> 1e-1 here)
    assert torch.allclose(got, plain, rtol=0, atol=1e-5), (got - plain).abs().max()
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


@pytest.fixture(scope="module")
def fidelity_captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny Qwen2.5-VL (4 layers), eager attention, two scikit-image photos (192 tokens each):
    the hidden states entering each layer and the true attention the image tokens receive."""
    pytest.importorskip("skimage.data")
    import skimage.data as skdata
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_tokenprune.alvts.overlap import capture
    from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

    # rope_theta of the real Qwen2.5-VL (the tiny default, 10, makes positions dominate the
    # attention so that the server tests see them; a content selector cannot track that)
    d = build_qwen2_5_vl(tmp_path_factory.mktemp("fidelity") / "q", seed=0, text_layers=4,
                         rope_theta=1e6)
    proc = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager").eval()
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe this image."}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    caps = []
    for name in ("astronaut", "coffee"):
        img = Image.fromarray(getattr(skdata, name)()).resize((448, 336), Image.BICUBIC)
        caps.append(capture(model, proc(text=[prompt], images=[img], return_tensors="pt")))
    return {"model": model, "captures": caps}


#: Measured when the selector was chosen (docs/alvts.md): the shipped selector (32 query rows,
#: rank 16) exceeds chance here by 0.18 on average (rope_theta 1e6; 0.12 with 1e5 or 1e4; rank
#: 32: 0.23, the automatic rank 8: 0.12); random scores by -0.04 to 0.03 over 5 seeds (the seed
#: used: -0.01); the selector's order reversed by -0.11.
FIDELITY_BOUND = 0.08


def _excess_over_chance(captures: list[Any], scorer: Any, first_layer: int) -> float:
    """Mean over photos, layers from ``first_layer`` and ratios 0.5 / 0.889 of (overlap with
    the text's true attention - k / N), for ``scorer(layer, hidden, state)`` -> blended score."""
    from vllm_tokenprune.alvts.overlap import overlaps

    total, count = 0.0, 0
    for cap in captures:
        n = cap.num_tokens
        state: dict[str, Any] = {"score": None}
        scores = {i: scorer(i, h[:n], state) for i, h in sorted(cap.entering.items())
                  if i >= first_layer}
        exact = {i: {"text": e["text"]} for i, e in cap.exact.items()}
        for key, per_layer in overlaps(scores, exact, first_layer, 0.0).items():
            chance = num_processed(n, float(key.split("@")[1])) / n
            total += sum(v - chance for v in per_layer)
            count += len(per_layer)
    return total / count


def test_shipped_selector_tracks_the_true_attention(fidelity_captures: dict[str, Any]) -> None:
    """The router with the shipped defaults (first_layer moved to 1: 4 layers; rank pinned to
    16, as the bound was measured: the automatic rank of this 128-wide model is 8) routes the
    tokens the text's true attention favours well above chance; planted bad selectors (random
    scores, the selector's order reversed) fall below the same bound."""
    model, caps = fidelity_captures["model"], fidelity_captures["captures"]
    opts = dataclasses.replace(AlvtsOptions(), first_layer=1, rank=16)
    router = router_for(model, opts)
    shipped = _excess_over_chance(caps, router.score, 1)
    assert shipped > FIDELITY_BOUND, shipped
    gen = torch.Generator().manual_seed(0)
    rand = _excess_over_chance(caps, lambda i, h, st: torch.rand(h.shape[0], generator=gen), 1)
    assert rand < FIDELITY_BOUND, rand
    reverse = _excess_over_chance(caps, lambda i, h, st: -router.score(i, h, st), 1)
    assert reverse < FIDELITY_BOUND, reverse
