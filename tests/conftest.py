"""Shared fixtures: tiny generated models and real vLLM servers (one per configuration, shared
by every test of the session that can use it)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import _pool
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

QWEN25_ARCH = "TokenPruneQwen2_5_VLForConditionalGeneration"


#: Test files marked ``slow`` as a whole: they build vLLM's engine config, processor or a model
#: through its loader in the test process, or are study-sized (docs/testing.md, "The fast
#: loop"). Single slow tests elsewhere (a Python subprocess importing vLLM) carry the mark.
SLOW_FILES = frozenset({"test_profile_run.py", "test_encoder_staging.py",
                        "test_gpu_emulation_worker.py", "test_scoring_skimage.py",
                        "test_startup.py", "test_alvts_tp.py", "test_alvts_quant.py",
                        "test_bench_auto_server.py"})


#: Session servers of this file: every test file that uses one (directly or through another
#: fixture) runs in the same pytest-xdist worker, so each starts once per session.
SESSION_SERVERS = ("tp_server", "plain_server", "hard_server")

#: Files run first under pytest-xdist, longest first (as a ``--durations`` run of the whole suite
#: on the 2-core machine ordered them): a long file that starts last would leave the other
#: worker idle at the end. Files not named here follow in collection order.
LONG_FILES = (
    "test_alvts_server.py", "test_hardening_server.py", "test_llava_server.py",
    "test_profile_server.py", "test_llava_next_server.py", "test_qwen3_vl_server.py",
    "test_prometheus.py", "test_qwen2_vl_server.py", "test_alvts_tp.py", "test_demo.py",
    "test_log.py", "test_gpu_emulation_worker.py", "test_profile_run.py", "test_startup.py",
    "test_vllm_internals.py",
)


#: ``-n auto`` runs two workers where the machine has at least this much memory (and two
#: cores): one runs every file that starts vLLM servers (their peak is about 14.5 GiB on the
#: 2-core dev machine, docs/testing.md), the other the rest (a few GiB).
MIN_GIB_TWO_WORKERS = 20


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, ``pyproject.toml``): two workers on a machine with two cores
    and :data:`MIN_GIB_TWO_WORKERS` GiB (the server files in one, the others in the other:
    :func:`pytest_xdist_make_scheduler`), else one. ``-n N`` asks for ``N``: more than two
    only share the files without servers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 16.0
    return 2 if (cores or 1) >= 2 and mem_gib >= MIN_GIB_TWO_WORKERS else 1


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker, the vLLM servers it starts bind their compute threads to one
    core of their own (worker ``gwN``: the N-th core the process may use), so two workers'
    servers do not share a core while the other idles (vLLM's ``auto`` binding puts every
    single-rank server on the same one)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[int(worker[2:]) % len(cores)])


class _Groups:
    """Union-find over test file names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        a, b = sorted((self.find(a), self.find(b)))
        self.parent[b] = a

    def mapping(self) -> dict[str, str]:
        return {name: self.find(name) for name in list(self.parent)}


def file_groups(test_dir: Path) -> dict[str, str]:
    """Each test file's pytest-xdist work unit (the controller's view, before any collection):
    the file itself, joined with every other file whose text names the same session server
    (:data:`SESSION_SERVERS`). The workers check this against the fixtures each test really
    uses (:func:`_check_groups`)."""
    groups = _Groups()
    first: dict[str, str] = {}
    for path in sorted(test_dir.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        groups.find(path.name)
        for server in SESSION_SERVERS:
            if re.search(rf"\b{server}\b", text):
                groups.join(path.name, first.setdefault(server, path.name))
    return groups.mapping()


#: Server files whose server is their own, short-lived and started by the test itself (the
#: README's demo command, a refusal): they run beside the others, not in the servers' worker.
OWN_SERVER_FILES = frozenset({"test_demo.py", "test_startup.py"})
#: Server files with a server of their own (a family's class server, the compiled profile
#: server) that the other worker runs after its in-process files, when there are two: the
#: servers' worker is the longer one.
LATE_FILES = frozenset({"test_qwen2_vl_server.py", "test_qwen3_vl_server.py",
                        "test_profile_server.py"})
#: The other worker launches its first :data:`LATE_FILES` server when this many of its in-process
#: tests are left (about 90 s of them on the 2-core machine; the compiled profile server takes
#: about 60 s to start there while both workers run), and each next one while the previous
#: one's tests run.
LATE_LEAD = 300


def server_files(test_dir: Path) -> frozenset[str]:
    """Test files with a test marked ``server`` (it starts or uses a real vLLM server), but for
    :data:`OWN_SERVER_FILES`."""
    return frozenset(path.name for path in test_dir.glob("test_*.py")
                     if path.name not in OWN_SERVER_FILES | LATE_FILES
                     and "pytest.mark.server" in path.read_text(encoding="utf-8"))


def _check_groups(items: list[pytest.Item], groups: dict[str, str]) -> None:
    """Fail the collection if a test reaches a session server through fixtures while its file
    is not in that server's group (the server would start once per worker): the file must name
    the fixture."""
    users: dict[str, set[str]] = {}
    for item in items:
        for server in SESSION_SERVERS:
            if server in getattr(item, "fixturenames", ()):
                users.setdefault(server, set()).add(item.path.name)
    for server, files in users.items():
        if len({groups.get(name, name) for name in files}) > 1:
            raise pytest.UsageError(
                f"tests/conftest.py: {sorted(files)} use the session server {server!r}, but not "
                f"all of them name it in their text, so pytest-xdist could start it in two "
                f"workers: name {server!r} in each of these files (a fixture argument or a "
                "comment)")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (``pyproject.toml``): a file's tests run in one worker, and files that
    share a session server (:func:`file_groups`) in the same one, so it starts once. The first
    worker (``gw0``) takes every unit with a server file (:func:`server_files`), in collection
    order, then whatever is left; the others take only units without one, and stop when none is
    left: the vLLM servers all run in one worker (memory as with one worker; its look-ahead
    starts, ``tests/_pool.py``, know what comes next), the in-process tests beside them."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    test_dir = Path(__file__).parent
    groups = file_groups(test_dir)
    servers = {groups.get(name, name) for name in server_files(test_dir)}
    late = {groups.get(name, name) for name in LATE_FILES}

    # units in collection order (LONG_FILES first), not xdist's default of most tests first
    config.option.loadscopereorder = False

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return groups.get(name, name)

        def _assign_work_unit(self, node: Any) -> None:
            # gw0 runs the server units; any node does when gw0 is gone (xdist shuts down the
            # nodes a small selection leaves without work, not necessarily the last one)
            server_node = node.gateway.id == "gw0" or all(
                n.gateway.id != "gw0" for n in self.nodes)
            mine = [s for s in self.workqueue if (s in servers) == server_node]
            if not server_node:  # LATE_FILES after the in-process files
                mine.sort(key=lambda s: s in late)
            if not mine and server_node:
                # what is left, but LATE_FILES while another node runs them (it launches their
                # servers ahead: pytest_runtest_call)
                alone = all(n is node for n in self.nodes)
                mine = [s for s in self.workqueue if alone or s not in late]
            if not mine:
                node.shutdown()  # only server units are left: gw0's
                return
            unit = self.workqueue.pop(mine[0])
            self.assigned_work.setdefault(node, {})[mine[0]] = unit
            collection = self.registered_collections[node]
            node.send_runtest_some([collection.index(nodeid)
                                    for nodeid, done in unit.items() if not done])

    return FileGroupScheduling(config, log)


def _session_pool(item: pytest.Item) -> _pool.Pool:
    pool = _pool.pool(item.config)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pool.elsewhere = LATE_FILES  # run by the other worker
    return pool


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Launch the next server configuration a later test uses while this one runs (after its
    fixtures are up, so the launch overlaps tests, not this test's own server start;
    ``tests/_pool.py``). The other worker launches its :data:`LATE_FILES` servers, in the order
    it runs them, once at most :data:`LATE_LEAD` of its in-process tests are left."""
    if os.environ.get("TOKENPRUNE_TEST_LOOKAHEAD", "1") == "0":
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        _session_pool(item).look_ahead(item)
        return
    late = item.config.stash.get(_LATE, None)
    if late is not None and late.left.get(item.nodeid, LATE_LEAD + 1) <= LATE_LEAD:
        _session_pool(item).look_ahead_keys(late.keys)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the servers no later test of this worker uses (``tests/_pool.py``)."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        _session_pool(item).release(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Launch every server configuration this test needs that is not up yet, together (its
    fixtures would start them one after the other; ``tests/_pool.py``)."""
    if os.environ.get("TOKENPRUNE_TEST_LOOKAHEAD", "1") == "0":
        return
    _session_pool(item).launch_own(item)


class _Late:
    """The other worker's plan for its :data:`LATE_FILES`: ``keys``, their server configurations
    in the order it runs them; ``left``, per in-process test, how many of them are left after
    it (the worker takes them in collection order, :func:`pytest_xdist_make_scheduler`)."""

    def __init__(self, items: list[pytest.Item]) -> None:
        servers = server_files(Path(__file__).parent)
        own = [item for item in items
               if item.path.name not in servers and item.path.name not in LATE_FILES]
        self.left = {item.nodeid: len(own) - 1 - i for i, item in enumerate(own)}
        self.keys: list[str] = []
        for item in items:
            if item.path.name in LATE_FILES:
                self.keys += [k for k in _pool.Pool.keys(item) if k not in self.keys]


_LATE = pytest.StashKey[_Late]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _pool.pool(session.config).stop_pending()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files of :data:`SLOW_FILES` are marked ``slow``. In a pytest-xdist worker, the groups are
    checked (:func:`_check_groups`) and the groups holding :data:`LONG_FILES` are put first (the
    controller hands work units out in collection order). Tests marked ``gpu`` need a CUDA
    device: skipped cleanly without one (docs/gpu.md)."""
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        groups = file_groups(Path(__file__).parent)
        _check_groups(items, groups)
        rank = {name: i for i, name in enumerate(LONG_FILES)}
        first: dict[str, int] = {}
        group = {name: groups.get(name, name) for name in {item.path.name for item in items}}
        for item in items:
            name = item.path.name
            first[group[name]] = min(first.get(group[name], len(rank)), rank.get(name, len(rank)))
        items.sort(key=lambda item: first[group[item.path.name]])  # stable: file order kept
        if os.environ["PYTEST_XDIST_WORKER"] != "gw0":
            config.stash[_LATE] = _Late(items)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (run `pytest -m gpu` on a GPU "
                            "machine, docs/gpu.md)")
    for item in gpu:
        item.add_marker(skip)

#: Server options shared by the Qwen2.5-VL servers. A small token budget per step makes vLLM's
#: chunked prefill split prompts (and images) across steps, so every request exercises it.
QWEN_SERVER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "96", "--seed", "0"]
DEFAULT_RATIO = 0.5
#: tp_server's token_prune.low_detail_tokens (below the tiny test images' counts at 0.5).
LOW_DETAIL_TOKENS = 4


def tiny_qwen(p: _pool.Pool) -> Path:
    """The session's tiny Qwen2.5-VL (built once, shared by fixtures and server factories)."""
    from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

    return p.cached("tiny_qwen", lambda: build_qwen2_5_vl(p.tmp("tiny") / "qwen2_5_vl", seed=0))


@pytest.fixture(scope="session")
def tiny_qwen_dir(request: pytest.FixtureRequest) -> Path:
    return tiny_qwen(_pool.pool(request.config))


@pytest.fixture(scope="session")
def tiny_qwen_vllm_config(tiny_qwen_dir: Path) -> Any:
    """vLLM's engine config of the TokenPrune tiny Qwen2.5-VL (LRCP at 0.5; no server, no
    weights loaded): builds the real processor in-process (``MULTIMODAL_REGISTRY``)."""
    import json

    from vllm.engine.arg_utils import EngineArgs

    from vllm_tokenprune.plugin import register

    register()
    overrides = json.loads(token_prune_overrides(QWEN25_ARCH, method="lrcp",
                                                 prune_ratio=DEFAULT_RATIO))
    args = EngineArgs(model=str(tiny_qwen_dir), hf_overrides=overrides, enforce_eager=True,
                      max_model_len=4096, dtype="float32", mm_processor_cache_gb=0.05)
    return args.create_engine_config()


def example_methods(p: _pool.Pool) -> Path:
    """``examples/method-package`` built and installed into a directory of its own (never the
    venv), once per session."""
    from tests._method_package import EXAMPLE, install

    def build() -> Path:
        work = p.tmp("method-packages")
        return install(EXAMPLE, work / "site", work)

    return p.cached("example_methods", build)


@pytest.fixture(scope="session")
def example_methods_dir(request: pytest.FixtureRequest) -> Path:
    """The example method package's install dir: ``tp_server`` serves its method
    (tests/test_method_plugins.py)."""
    return example_methods(_pool.pool(request.config))


@_pool.factory("tp_qwen")
def _tp_qwen(p: _pool.Pool) -> dict[str, Any]:
    from tests._method_package import python_path

    overrides = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=DEFAULT_RATIO,
                                      low_detail_tokens=LOW_DETAIL_TOKENS)
    return {"server": VLLMServer(
        tiny_qwen(p), [*QWEN_SERVER_ARGS, "--hf-overrides", overrides],
        log_path=_pool.log_dir() / "tp_qwen.log",
        env={"PYTHONPATH": python_path(example_methods(p))}, wait=False)}


@_pool.factory("hard")
def _hard(p: _pool.Pool) -> dict[str, Any]:
    from tests._hard_server import start_hard_server

    log = p.tmp("guard") / "encoder-calls.log"
    return {"server": start_hard_server(tiny_qwen(p), _pool.log_dir(), log, wait=False),
            "log": log}


@_pool.factory("plain_qwen")
def _plain_qwen(p: _pool.Pool) -> dict[str, Any]:
    return {"server": VLLMServer(tiny_qwen(p), QWEN_SERVER_ARGS,
                                 log_path=_pool.log_dir() / "plain_qwen.log", wait=False)}


_pool.uses("*", "tp_server", "tp_qwen")
_pool.uses("*", "hard_server", "hard")
_pool.uses("*", "plain_server", "plain_qwen")


@pytest.fixture(scope="session")
def tp_server(request: pytest.FixtureRequest) -> Iterator[VLLMServer]:
    """TokenPrune Qwen2.5-VL, LRCP at ratio 0.5 by default (``detail: "low"`` keeps at most
    :data:`LOW_DETAIL_TOKENS`); requests may override. The example method package is on its
    ``PYTHONPATH``."""
    server = _pool.pool(request.config).take("tp_qwen")["server"]
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hard_server(request: pytest.FixtureRequest) -> Iterator[tuple[VLLMServer, Path]]:
    """(the hardened TokenPrune Qwen2.5-VL of tests/_hard_server.py, its encoder-call log):
    tests/test_hardening_server.py and tests/test_worker_safety.py."""
    started = _pool.pool(request.config).take("hard")
    yield started["server"], started["log"]
    started["server"].stop()


@pytest.fixture(scope="session")
def plain_server(request: pytest.FixtureRequest) -> Iterator[VLLMServer]:
    """vLLM's own Qwen2_5_VLForConditionalGeneration on the same weights (the plugin loaded)."""
    server = _pool.pool(request.config).take("plain_qwen")["server"]
    yield server
    server.stop()
