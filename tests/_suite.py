"""The server-test suite every TokenPrune family runs (``tests/test_<family>_server.py``).

A family's test class subclasses :class:`FamilyServerSuite` and names its architecture, tiny
model builder, media cases and methods. Per class, one TokenPrune server serves every test of
the class (float32, ``--max-num-batched-tokens 96``, so chunked prefill splits prompts and media
across steps in every request); Qwen2.5-VL's class uses the session servers of
tests/conftest.py and adds vLLM's own plain architecture on the same weights (``plain``). The
unpruned side of every comparison is ``prune_ratio`` 0 on the TokenPrune server, itself pinned
to transformers' model and processor (and, for Qwen2.5-VL, to the plain architecture).
Everything is checked through the real ``openai`` client against real server processes:

* ``prune_ratio`` 0: ``usage.prompt_tokens`` and the response's ``token_prune`` counts are
  transformers' processor's, and the next-token logprobs equal transformers' unpruned model
  (for the M-RoPE families, the same reference at wrong positions differs by more than ten
  tolerances); where the class has ``plain``, greedy tokens, logprobs and prompt tokens equal
  vLLM's plain architecture's;
* ``usage.prompt_tokens`` is exactly the processor's unpruned count minus
  ``N - num_kept(N, ratio)`` per item, for every media case and several ratios (N from
  transformers' own processor/model);
* next-token logprobs with pruning equal transformers' model fed only the kept embeddings at
  the positions the integration claims (:mod:`tests._hf_reference`), for every method, where
  the kept embeddings are the ones ``vllm_tokenprune.preview`` reports (so the preview shows
  what the server keeps) and its counts are the response's ``token_prune`` field; the same
  reference fed a wrong set of the same size (another method's, shifted by one, the first k)
  or, for Qwen, wrong positions (h/w swapped, one column off) differs by more than ten
  tolerances on the same token ids (the controls: the comparison can fail);
* a concurrent batch mixing media kinds, ratios and methods: exact token accounting, and each
  request's tokens and logprobs equal the same request served alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from tests import _pool
from tests._hf_reference import (
    POSITION_CONTROLS,
    control_sets,
    prepared_logprobs,
    prepared_step_logprobs,
    scored_tokens,
)
from vllm_tokenprune import list_methods, num_kept
from vllm_tokenprune.preview import preview, server_config
from vllm_tokenprune.preview._extract import Prepared, prepare
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.testing.media import (
    image_part,
    make_image,
    make_video,
    media_messages,
    video_part,
)
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

PROMPT = "Describe this image."
#: Server options of every family's pair of servers.
SERVER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "96", "--seed", "0"]
DEFAULT_RATIO = 0.5
#: Both sides float32 on CPU: the tolerance is accumulation-order noise (the largest error
#: measured over every family's reference tests is in docs/testing.md, about 1e-6).
LOGPROB_TOL = 1e-4
#: A control (the reference fed a wrong kept set of the right size, or wrong positions) must
#: differ from the server by more than this many tolerances on the compared token ids: the
#: reference test could see that mistake.
CONTROL_FACTOR = 10

#: A media item in a test case: ("image", width, height, seed) or
#: ("video", width, height, frames, seed) (mp4 at 2 fps).
Spec = tuple[Any, ...]


def make_media(spec: Spec) -> Any:
    if spec[0] == "image":
        _, w, h, seed = spec
        return make_image(w, h, seed=seed)
    _, w, h, frames, seed = spec
    return _video(w, h, frames, seed)


_videos: dict[tuple[int, int, int, int], bytes] = {}


def _video(w: int, h: int, frames: int, seed: int) -> bytes:
    key = (w, h, frames, seed)
    if key not in _videos:
        _videos[key] = make_video(w, h, frames, fps=2.0, seed=seed)
    return _videos[key]


def chat(server: VLLMServer, media: list[Any], *, max_tokens: int = 1, logprobs: bool = False,
         text: str = PROMPT, uuids: list[str] | None = None, **extra: Any) -> Any:
    """One chat request; ``uuids``: the media items' vLLM cache identities (fresh ones give
    a request its own encoder-cache and prefix-cache entries)."""
    kwargs: dict[str, Any] = {"logprobs": True, "top_logprobs": 5} if logprobs else {}
    messages = media_messages(media, text)
    if uuids is not None:
        parts: list[dict[str, Any]] = [
            video_part(m, uuid=u) if isinstance(m, bytes) else image_part(m, uuid=u)
            for m, u in zip(media, uuids, strict=True)]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return server.openai().chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra or None,
        **kwargs,
    )


def top_logprobs(res: Any, step: int = 0) -> dict[int, float]:
    """{token id: logprob} of a response's top-5 at ``step`` (sent with
    ``return_tokens_as_token_ids``)."""
    entries = res.choices[0].logprobs.content[step].top_logprobs
    return {int(e.token.removeprefix("token_id:")): e.logprob for e in entries}


def gap(got: dict[int, float], ref: torch.Tensor | dict[int, float]) -> float:
    """Largest |got - ref| log-probability over ``got``'s token ids."""
    return max(abs(lp - float(ref[t])) for t, lp in got.items())


def processor_tokens(prep: Prepared) -> int:
    """The unpruned prompt's length as transformers' processor lays it out (chat template,
    media placeholders expanded): what vLLM serves at ``prune_ratio`` 0."""
    return int(prep.inputs["input_ids"].shape[-1])


def record_error(line: str) -> None:
    """Append a measured error to ``$TOKENPRUNE_TEST_LOGS/reference-errors.tsv`` (the figures
    docs/testing.md quotes)."""
    log_dir = os.environ.get("TOKENPRUNE_TEST_LOGS")
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(log_dir) / "reference-errors.tsv", "a") as f:
            f.write(line + "\n")


def reference_for(model_dir: Path, media: list[Any], method: str, ratio: float, *,
                  overrides: str, video_ratio: float | None = None, text: str = PROMPT
                  ) -> tuple[Any, torch.Tensor, int]:
    """(the preview of the server's selection, the reference's next-token log-probabilities
    for that selection, the pruned prompt length)."""
    shown = preview(model_dir, media, method, ratio, prompt=text, video_ratio=video_ratio,
                    hf_overrides=overrides)
    ref, ref_len = prepared_logprobs(shown.prepared, [i.kept_rows for i in shown.items])
    return shown, ref, ref_len


def assert_matches_reference(res: Any, model_dir: Path, media: list[Any], method: str,
                             ratio: float, *, overrides: str, video_ratio: float | None = None,
                             text: str = PROMPT, label: str = "") -> None:
    """The server's response ``res`` (one token, top-5 logprobs as token ids) against
    transformers' model fed only the kept embeddings (:mod:`tests._hf_reference`), with
    controls that show the comparison could fail.

    The kept rows are the ones :func:`vllm_tokenprune.preview.preview` reports (its counts
    must be the response's ``token_prune`` field). The server's top-5 log-probabilities equal
    the reference's within :data:`LOGPROB_TOL`; the reference fed a wrong set of the same size
    (another method's, the right one shifted by one, the first k) and, for the M-RoPE
    families, the right set at wrong positions (h and w swapped, one column to the right) each
    differ from the server by more than ``CONTROL_FACTOR * LOGPROB_TOL`` on the same ids.
    """
    shown, ref, ref_len = reference_for(model_dir, media, method, ratio, overrides=overrides,
                                        video_ratio=video_ratio, text=text)
    assert [(i.modality, i.tokens, i.kept) for i in shown.items] == [
        (i["modality"], i["tokens"], i["kept"]) for i in res.model_extra[FIELD]["items"]]
    prep = shown.prepared
    right = [i.kept_rows for i in shown.items]
    assert res.usage.prompt_tokens == ref_len
    got = top_logprobs(res)
    assert len(got) == 5
    err = gap(got, ref)
    assert err <= LOGPROB_TOL, (method, err)
    assert max(got.values()) == pytest.approx(float(ref.max()), abs=LOGPROB_TOL)
    ratios = {"image": ratio, "video": ratio if video_ratio is None else video_ratio}
    controls = {name: prepared_logprobs(prep, rows)[0] for name, rows in control_sets(
        prep, right, method, ratios, server_config(str(model_dir), overrides)).items()}
    if prep.model_type.startswith("qwen"):
        controls.update({name: prepared_logprobs(prep, right, name)[0]
                         for name in POSITION_CONTROLS})
    gaps = {name: gap(got, lp) for name, lp in controls.items()}
    record_error("\t".join([label or prep.model_type, method, f"{err:.3g}",
                             *(f"{k}={v:.3g}" for k, v in gaps.items())]))
    weak = {k: v for k, v in gaps.items() if v <= CONTROL_FACTOR * LOGPROB_TOL}
    assert not weak, f"controls the comparison cannot tell from the server: {weak}"


class FamilyServerSuite:
    """Subclass as ``Test<Family>`` and set the class attributes below."""

    ARCH: ClassVar[str]
    NAME: ClassVar[str]
    BUILDER: ClassVar[Callable[..., Path]]
    #: Media cases for the accounting test: each a list of media specs (one request).
    CASES: ClassVar[list[list[Spec]]]
    RATIOS: ClassVar[list[float]] = [0.25, 0.75, 0.889]
    #: Media of the ratio-0 identity and the reference tests.
    EXACT_MEDIA: ClassVar[list[Spec]]
    #: Media for the concurrent batch, cycled (Qwen: alternate images and videos, so that
    #: every method meets both).
    MIXED_MEDIA: ClassVar[list[Spec]]

    @classmethod
    def overrides(cls) -> str:
        """The TokenPrune server's ``--hf-overrides``."""
        return token_prune_overrides(cls.ARCH, method="lrcp", prune_ratio=DEFAULT_RATIO)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass with its own TokenPrune server registers it with the session's pool
        (``tests/_pool.py``: started while earlier tests run)."""
        super().__init_subclass__(**kwargs)
        if "tp" in cls.__dict__ or "NAME" not in cls.__dict__:
            return  # reuses another server (e.g. Qwen2.5-VL: the session's tp_server)
        key = f"family:{cls.NAME}"

        @_pool.factory(key)
        def start(p: _pool.Pool) -> dict[str, Any]:
            return {"server": VLLMServer(
                cls.model(p), [*SERVER_ARGS, "--hf-overrides", cls.overrides()],
                log_path=_pool.log_dir() / f"{cls.NAME}_tp.log", wait=False)}

        _pool.uses(Path(sys.modules[cls.__module__].__file__ or "").name, "tp", key)

    @classmethod
    def model(cls, p: _pool.Pool) -> Path:
        """The family's tiny model (built once per session)."""
        return p.cached(f"family:{cls.NAME}",
                        lambda: cls.BUILDER(p.tmp("tiny") / cls.NAME, seed=0))

    # -- fixtures (a subclass may override them, e.g. to reuse session servers)
    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, request: pytest.FixtureRequest) -> Path:
        return cls.model(_pool.pool(request.config))

    @pytest.fixture(scope="class")
    @classmethod
    def tp(cls, request: pytest.FixtureRequest) -> Iterator[VLLMServer]:
        """The family's TokenPrune server."""
        server = _pool.pool(request.config).take(f"family:{cls.NAME}")["server"]
        yield server
        server.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def plain(cls) -> VLLMServer | None:
        """vLLM's own architecture on the same weights, where the class has one (Qwen2.5-VL:
        the session ``plain_server``); None elsewhere."""
        return None

    # -- helpers
    @staticmethod
    def unpruned(tp: VLLMServer, media: list[Any]) -> int:
        """The prompt's tokens at ``prune_ratio`` 0 (pinned to transformers' processor by
        :meth:`test_ratio_zero_matches_transformers_and_plain_model`)."""
        return chat(tp, media, prune_ratio=0.0).usage.prompt_tokens

    @staticmethod
    def saved(model_dir: Path, media: list[Any], ratio: float,
              video_ratio: float | None = None) -> int:
        total = 0
        for item in media:
            n, _ = scored_tokens(model_dir, item)
            r = video_ratio if isinstance(item, bytes) and video_ratio is not None else ratio
            total += n - num_kept(n, r)
        return total

    # -- tests
    def test_ratio_zero_matches_transformers_and_plain_model(
        self, tp: VLLMServer, plain: VLLMServer | None, model_dir: Path
    ) -> None:
        """``prune_ratio`` 0 prunes nothing: the prompt-token count and each item's
        ``token_prune`` counts are transformers' processor's, and the top-5 logprobs of each of
        8 greedy steps are transformers' unpruned model's, fed the prompt and the tokens the
        server generated before that step (within LOGPROB_TOL; the server's token is the
        reference's argmax, up to it; for the M-RoPE families the first step's reference at wrong
        positions differs by more than ten tolerances, so the comparison sees positions).
        Where the class has vLLM's plain architecture, the 8 tokens, their logprobs and the
        prompt count equal its."""
        media = [make_media(s) for s in self.EXACT_MEDIA]
        b = chat(tp, media, max_tokens=8, logprobs=True, prune_ratio=0.0,
                 return_tokens_as_token_ids=True)
        shown, ref, ref_len = reference_for(model_dir, media, "lrcp", 0.0,
                                            overrides=self.overrides())
        assert [(i.modality, i.tokens, i.tokens) for i in shown.items] == [
            (i["modality"], i["tokens"], i["kept"]) for i in b.model_extra[FIELD]["items"]]
        assert [i.tokens for i in shown.items] == [scored_tokens(model_dir, m)[0]
                                                   for m in media]
        prep = shown.prepared
        assert b.usage.prompt_tokens == ref_len == processor_tokens(prep)
        got = top_logprobs(b)
        err = gap(got, ref)
        assert err <= LOGPROB_TOL, err
        right = [i.kept_rows for i in shown.items]
        content = b.choices[0].logprobs.content
        generated = [int(t.token.removeprefix("token_id:")) for t in content]
        steps = prepared_step_logprobs(prep, right, generated[:-1])
        for k, token in enumerate(generated):
            step = top_logprobs(b, k)
            # the server's greedy token is the reference's argmax (up to the tolerance)
            assert float(steps[k].max() - steps[k][token]) <= LOGPROB_TOL, k
            err = max(err, gap(step, steps[k]))
            assert gap(step, steps[k]) <= LOGPROB_TOL, (k, gap(step, steps[k]))
        if prep.model_type.startswith("qwen"):
            gaps = {name: gap(got, prepared_logprobs(prep, right, name)[0])
                    for name in POSITION_CONTROLS}
            weak = {k: v for k, v in gaps.items() if v <= CONTROL_FACTOR * LOGPROB_TOL}
            assert not weak, f"controls the comparison cannot tell from the server: {weak}"
        record_error(f"{self.NAME} ratio 0\tnone\t{err:.3g}")
        if plain is None:
            return
        a = chat(plain, media, max_tokens=8, logprobs=True, return_tokens_as_token_ids=True)
        assert [t.token for t in a.choices[0].logprobs.content] == \
            [t.token for t in b.choices[0].logprobs.content]
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        lp_a = [t.logprob for t in a.choices[0].logprobs.content]
        lp_b = [t.logprob for t in b.choices[0].logprobs.content]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)

    def test_prompt_token_accounting(self, tp: VLLMServer, model_dir: Path) -> None:
        """Every media case at several ratios: exactly the saved tokens fewer than the
        processor's unpruned count (transformers' processor: :func:`processor_tokens`)."""
        for case in self.CASES:
            media = [make_media(s) for s in case]
            unpruned = self.unpruned(tp, media)
            assert unpruned == processor_tokens(prepare(str(model_dir), media, PROMPT)), case
            for ratio in self.RATIOS:
                expected = self.saved(model_dir, media, ratio)
                assert expected > 0
                got = chat(tp, media, prune_ratio=ratio).usage.prompt_tokens
                assert got == unpruned - expected, (case, ratio)
        # the server's default ratio applies to a request that sends none
        media = [make_media(s) for s in self.CASES[0]]
        unpruned = self.unpruned(tp, media)
        got = chat(tp, media).usage.prompt_tokens
        assert got == unpruned - self.saved(model_dir, media, DEFAULT_RATIO)

    @pytest.mark.parametrize("method", list_methods())
    def test_logprobs_match_transformers_reference(
        self, tp: VLLMServer, model_dir: Path, method: str
    ) -> None:
        """Next-token logprobs with pruning == transformers' model fed only the kept
        embeddings at the claimed positions (both float32: tolerance LOGPROB_TOL), for every
        method, on EXACT_MEDIA (Qwen: an image and a video, at different ratios); wrong kept
        sets and wrong positions fed to the same reference differ by far more
        (:func:`assert_matches_reference`)."""
        media = [make_media(s) for s in self.EXACT_MEDIA]
        ratio, video_ratio = 0.75, 0.6
        extra: dict[str, Any] = {"prune_ratio": ratio, "prune_method": method,
                                 "return_tokens_as_token_ids": True}
        has_video = any(isinstance(m, bytes) for m in media)
        if has_video:
            extra["video_prune_ratio"] = video_ratio
        res = chat(tp, media, logprobs=True, **extra)
        assert_matches_reference(res, model_dir, media, method, ratio,
                                 video_ratio=video_ratio if has_video else None,
                                 overrides=self.overrides(), label=self.NAME)

    def test_concurrent_mixed_batch(self, tp: VLLMServer, model_dir: Path) -> None:
        """Concurrent requests: different media kinds, ratios (image and video) and methods in
        one continuous batch, each with exact token accounting and the same tokens and
        logprobs as the same request served alone.

        Every request's media carry fresh cache identities (item uuids) per round, so the
        concurrent round cannot reuse the lone round's encoder outputs or prefix blocks: the
        batch really scores and prefills them together."""
        ratios = [0.0, 0.3, 0.5, 0.75, 0.889, 0.6, 0.2]
        methods = list_methods()
        cases = []
        for i in range(2 * len(methods)):
            spec = self.MIXED_MEDIA[(i + i // len(methods)) % len(self.MIXED_MEDIA)]
            media = [make_media(spec)]
            extra: dict[str, Any] = {"prune_ratio": ratios[i % len(ratios)],
                                     "prune_method": methods[i % len(methods)],
                                     "return_tokens_as_token_ids": True}
            video_ratio = None
            if spec[0] == "video" and i % 3 == 0:
                video_ratio = ratios[(i + 3) % len(ratios)]
                extra["video_prune_ratio"] = video_ratio
            cases.append((media, extra, video_ratio))
        unpruned = [self.unpruned(tp, media) for media, _, _ in cases]

        def one(i: int, round_: str) -> Any:
            media, extra, _ = cases[i]
            uuids = [f"{self.NAME}-{round_}-{i}-{j}" for j in range(len(media))]
            return chat(tp, media, max_tokens=3, logprobs=True, uuids=uuids, **extra)

        alone = [one(i, "alone") for i in range(len(cases))]
        with ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(lambda i: one(i, "together"), range(len(cases))))
        for i, (media, extra, video_ratio) in enumerate(cases):
            expected = unpruned[i] - self.saved(model_dir, media, extra["prune_ratio"],
                                                video_ratio)
            assert together[i].usage.prompt_tokens == alone[i].usage.prompt_tokens \
                == expected, extra
            a, b = alone[i].choices[0].logprobs.content, together[i].choices[0].logprobs.content
            assert [t.token for t in b] == [t.token for t in a], extra
            for step in range(len(a)):
                ta, tb = top_logprobs(alone[i], step), top_logprobs(together[i], step)
                assert set(tb) == set(ta), (extra, step)
                assert gap(tb, ta) <= LOGPROB_TOL, (extra, step)
