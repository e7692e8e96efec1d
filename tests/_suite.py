"""The server-test suite every TokenPrune family runs (``tests/test_<family>_server.py``).

A family's test class subclasses :class:`FamilyServerSuite` and names its architecture, tiny
model builder, media cases and methods. Per class, one TokenPrune server and one server of the
plain vLLM architecture on the same weights start together (in parallel) and serve every test
of the class; both run float32 with ``--max-num-batched-tokens 96``, so chunked prefill splits
prompts and media across steps in every request. Everything is checked through the real
``openai`` client against real server processes:

* ``prune_ratio`` 0: greedy tokens, logprobs and ``usage.prompt_tokens`` equal the plain
  architecture's;
* ``usage.prompt_tokens`` is exactly the plain count minus ``N - num_kept(N, ratio)`` per
  item, for every media case and several ratios (N from transformers' own processor/model);
* next-token logprobs with pruning equal transformers' model fed only the kept embeddings at
  the positions the integration claims (:mod:`tests._hf_reference`), for every method, where
  the kept embeddings are the ones ``vllm_tokenprune.preview`` reports (so the preview shows
  what the server keeps) and its counts are the response's ``token_prune`` field;
* a concurrent batch mixing media kinds, ratios and methods is exact too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests._hf_reference import reference_logprobs, scored_tokens
from vllm_tokenprune import list_methods, num_kept
from vllm_tokenprune.preview import preview
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.testing.media import make_image, make_video, media_messages
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

PROMPT = "Describe this image."
#: Server options of every family's pair of servers.
SERVER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "96", "--seed", "0"]
DEFAULT_RATIO = 0.5
#: Both sides float32 on CPU: the tolerance is accumulation-order noise (measured ~1e-6).
LOGPROB_TOL = 2e-3

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
         text: str = PROMPT, **extra: Any) -> Any:
    kwargs: dict[str, Any] = {"logprobs": True, "top_logprobs": 5} if logprobs else {}
    return server.openai().chat.completions.create(
        model=server.model,
        messages=media_messages(media, text),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra or None,
        **kwargs,
    )


def start_servers(specs: dict[str, tuple[Path, list[str]]], name: str) -> dict[str, VLLMServer]:
    """Start several servers at once (their start-ups overlap); stop all if one fails."""
    log_dir = Path(os.environ.get("TOKENPRUNE_TEST_LOGS", "/tmp/vllm-tokenprune-test-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def start(label: str) -> VLLMServer:
        model, args = specs[label]
        return VLLMServer(model, args, log_path=log_dir / f"{name}_{label}.log")

    started: dict[str, VLLMServer] = {}
    errors: list[BaseException] = []
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {label: pool.submit(start, label) for label in specs}
        for label, fut in futures.items():
            try:
                started[label] = fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
    if errors:
        for server in started.values():
            server.stop()
        raise errors[0]
    return started


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

    # -- fixtures (a subclass may override them, e.g. to reuse session servers)
    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return cls.BUILDER(tmp_path_factory.mktemp("tiny") / cls.NAME, seed=0)

    @pytest.fixture(scope="class")
    @classmethod
    def servers(cls, model_dir: Path) -> Iterator[tuple[VLLMServer, VLLMServer]]:
        started = start_servers(
            {"tp": (model_dir, [*SERVER_ARGS, "--hf-overrides", cls.overrides()]),
             "plain": (model_dir, list(SERVER_ARGS))},
            cls.NAME,
        )
        yield started["tp"], started["plain"]
        for server in started.values():
            server.stop()

    # -- helpers
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
    def test_ratio_zero_is_identical_to_plain_model(
        self, servers: tuple[VLLMServer, VLLMServer]
    ) -> None:
        tp, plain = servers
        media = [make_media(s) for s in self.EXACT_MEDIA]
        a = chat(plain, media, max_tokens=8, logprobs=True)
        b = chat(tp, media, max_tokens=8, logprobs=True, prune_ratio=0.0)
        assert [t.token for t in a.choices[0].logprobs.content] == \
            [t.token for t in b.choices[0].logprobs.content]
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        lp_a = [t.logprob for t in a.choices[0].logprobs.content]
        lp_b = [t.logprob for t in b.choices[0].logprobs.content]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)

    def test_prompt_token_accounting(self, servers: tuple[VLLMServer, VLLMServer],
                                     model_dir: Path) -> None:
        """Every media case at several ratios: exactly the saved tokens fewer."""
        tp, plain = servers
        for case in self.CASES:
            media = [make_media(s) for s in case]
            unpruned = chat(plain, media).usage.prompt_tokens
            for ratio in self.RATIOS:
                expected = self.saved(model_dir, media, ratio)
                assert expected > 0
                got = chat(tp, media, prune_ratio=ratio).usage.prompt_tokens
                assert got == unpruned - expected, (case, ratio)
        # the server's default ratio applies to a request that sends none
        media = [make_media(s) for s in self.CASES[0]]
        unpruned = chat(plain, media).usage.prompt_tokens
        got = chat(tp, media).usage.prompt_tokens
        assert got == unpruned - self.saved(model_dir, media, DEFAULT_RATIO)

    @pytest.mark.parametrize("method", list_methods())
    def test_logprobs_match_transformers_reference(
        self, servers: tuple[VLLMServer, VLLMServer], model_dir: Path, method: str
    ) -> None:
        """Next-token logprobs with pruning == transformers' model fed only the kept
        embeddings at the claimed positions (both float32: tolerance LOGPROB_TOL), for every
        method, on EXACT_MEDIA (Qwen: an image and a video, at different ratios)."""
        tp, _ = servers
        media = [make_media(s) for s in self.EXACT_MEDIA]
        ratio, video_ratio = 0.75, 0.6
        extra: dict[str, Any] = {"prune_ratio": ratio, "prune_method": method,
                                 "return_tokens_as_token_ids": True}
        has_video = any(isinstance(m, bytes) for m in media)
        if has_video:
            extra["video_prune_ratio"] = video_ratio
        res = chat(tp, media, logprobs=True, **extra)
        # the kept set the preview reports, fed alone to transformers' LM, gives the server's
        # logprobs; the preview's counts are the response's token_prune field
        shown = preview(model_dir, media, method, ratio, prompt=PROMPT,
                        video_ratio=video_ratio if has_video else None,
                        hf_overrides=self.overrides())
        assert [(i.modality, i.tokens, i.kept) for i in shown.items] == [
            (i["modality"], i["tokens"], i["kept"]) for i in res.model_extra[FIELD]["items"]]
        ref, ref_len = reference_logprobs(model_dir, media, PROMPT, ratio, method,
                                          kept=[i.kept_rows for i in shown.items])
        assert res.usage.prompt_tokens == ref_len
        top = res.choices[0].logprobs.content[0].top_logprobs
        assert len(top) == 5
        for entry in top:
            token_id = int(entry.token.removeprefix("token_id:"))
            assert entry.logprob == pytest.approx(float(ref[token_id]), abs=LOGPROB_TOL)
        assert top[0].logprob == pytest.approx(float(ref.max()), abs=LOGPROB_TOL)

    def test_pruning_changes_the_output_distribution(
        self, servers: tuple[VLLMServer, VLLMServer]
    ) -> None:
        """Guards the reference test against a hook that silently does nothing."""
        tp, _ = servers
        media = [make_media(self.EXACT_MEDIA[0])]
        full = chat(tp, media, logprobs=True, prune_ratio=0.0)
        pruned = chat(tp, media, logprobs=True, prune_ratio=0.9)
        assert pruned.usage.prompt_tokens < full.usage.prompt_tokens
        a = full.choices[0].logprobs.content[0].top_logprobs[0].logprob
        b = pruned.choices[0].logprobs.content[0].top_logprobs[0].logprob
        assert a != pytest.approx(b, abs=1e-6)

    def test_concurrent_mixed_batch(self, servers: tuple[VLLMServer, VLLMServer],
                                    model_dir: Path) -> None:
        """Concurrent requests: different media kinds, ratios (image and video) and methods in
        one continuous batch, each with exact token accounting."""
        tp, plain = servers
        ratios = [0.0, 0.3, 0.5, 0.75, 0.889, 0.6, 0.2]
        methods = list_methods()
        cases = []
        for i in range(2 * len(methods)):
            spec = self.MIXED_MEDIA[(i + i // len(methods)) % len(self.MIXED_MEDIA)]
            media = [make_media(spec)]
            extra: dict[str, Any] = {"prune_ratio": ratios[i % len(ratios)],
                                     "prune_method": methods[i % len(methods)]}
            video_ratio = None
            if spec[0] == "video" and i % 3 == 0:
                video_ratio = ratios[(i + 3) % len(ratios)]
                extra["video_prune_ratio"] = video_ratio
            cases.append((media, extra, video_ratio))
        unpruned = [chat(plain, media).usage.prompt_tokens for media, _, _ in cases]

        def one(i: int) -> int:
            media, extra, _ = cases[i]
            return chat(tp, media, max_tokens=3, **extra).usage.prompt_tokens

        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(one, range(len(cases))))
        for i, (media, extra, video_ratio) in enumerate(cases):
            expected = unpruned[i] - self.saved(model_dir, media, extra["prune_ratio"],
                                                video_ratio)
            assert got[i] == expected, extra
