"""The suite's vLLM servers, started ahead of the tests that use them (test process).

A server start costs 25-60 s on the 2-core machine, most of it three Python processes importing
vLLM one after the other (API server, engine core, worker: vLLM's CPU build spawns them), mostly
on one core. So while one module's tests run on its server, the next module's server starts
on the other core: :func:`look_ahead` (called before every test by ``tests/conftest.py``) finds the
next server the session's remaining tests will use and launches it, and the fixture that needs
it takes it from the pool (:meth:`Pool.take`), already up or starting.

Each server configuration is a *factory* registered under a key (:func:`factory`) by the module
that owns it, and the fixtures that use it name it (:func:`uses`): ``(file, fixture name) ->
key``. A factory takes the pool (model directories and scratch directories come from it, shared
with the fixtures, see :meth:`Pool.cached`) and returns a mapping whose
:class:`~vllm_tokenprune.testing.server.VLLMServer` values are launched without waiting. Nothing
changes for the tests: the same servers, the same arguments, started once each; only when.

Bounds: at most :data:`MAX_PENDING` look-ahead starts under way, never one whose servers the
machine's available memory cannot hold with room to spare (:data:`SERVER_GIB`,
:data:`SPARE_GIB`); a server no later test uses is stopped at once (:meth:`Pool.release`), not at
the session's end; under pytest-xdist, only in the worker that runs every server file
(``tests/conftest.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from vllm_tokenprune.testing.server import VLLMServer

#: Memory a look-ahead start reserves per server process group (a tiny-model CPU server is
#: about 3.2 GiB resident: three processes with torch and vLLM imported).
SERVER_GIB = 3.5
#: Memory left free after a look-ahead start (the running tests' servers and models grow).
SPARE_GIB = 4.0
#: Look-ahead starts under way at once (each still bounded by memory).
MAX_PENDING = 1

Factory = Callable[["Pool"], Mapping[str, Any]]

_FACTORIES: dict[str, Factory] = {}
_SIZES: dict[str, int] = {}
_USES: dict[tuple[str, str], str] = {}


def factory(key: str, servers: int = 1) -> Callable[[Factory], Factory]:
    """Register the function below as the factory of server configuration ``key`` (``servers``:
    how many server process groups it starts, for the memory bound)."""

    def register(fn: Factory) -> Factory:
        _FACTORIES[key] = fn
        _SIZES[key] = servers
        return fn

    return register


def uses(file: str, fixture: str, key: str) -> None:
    """Tests of ``file`` (a file name, or ``"*"`` for any) that use ``fixture`` need ``key``."""
    _USES[(file, fixture)] = key


def _servers(obj: Mapping[str, Any]) -> list[VLLMServer]:
    return [v for v in obj.values() if isinstance(v, VLLMServer)]


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class Pool:
    """The session's server configurations: launched ahead (:meth:`prestart`) or on demand, each
    taken once (:meth:`take`)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._cache: dict[str, Any] = {}
        self._pending: dict[str, Mapping[str, Any]] = {}
        self._taken: set[str] = set()
        self._first_use: list[tuple[int, str]] | None = None
        self._index: dict[str, int] = {}
        self._last_use: dict[str, int] = {}
        self._live: dict[str, Mapping[str, Any]] = {}
        #: Test files another worker runs: never planned for here.
        self.elsewhere: frozenset[str] = frozenset()

    # -- shared inputs of factories and fixtures
    def tmp(self, name: str) -> Path:
        """A new scratch directory under the session's base temp (``tmp_path_factory``)."""
        return self.config._tmp_path_factory.mktemp(name)  # type: ignore[attr-defined]

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``'s result, made once per session (tiny models, built packages)."""
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    # -- servers
    def prestart(self, key: str) -> None:
        if key in self._pending or key in self._taken:
            return
        self._pending[key] = _FACTORIES[key](self)

    def take(self, key: str) -> Mapping[str, Any]:
        """``key``'s servers, up (launched now if nobody launched them ahead); stopped all if
        one fails to start."""
        if key in self._taken:
            raise RuntimeError(f"server configuration {key!r} taken twice in one session")
        obj = self._pending.pop(key, None)
        if obj is None:
            obj = _FACTORIES[key](self)
        self._taken.add(key)
        try:
            for server in _servers(obj):
                server.wait_ready()
        except BaseException:
            for server in _servers(obj):
                server.stop()
            raise
        self._live[key] = obj
        return obj

    def stop_pending(self) -> None:
        """Stop what was launched ahead and never taken (its tests deselected or failed)."""
        for obj in self._pending.values():
            for server in _servers(obj):
                server.stop()
        self._pending.clear()

    # -- look-ahead
    @staticmethod
    def keys(item: pytest.Item) -> list[str]:
        """The server configurations ``item`` uses (through its fixtures)."""
        found = []
        for name in getattr(item, "fixturenames", ()):
            key = _USES.get((item.path.name, name)) or _USES.get(("*", name))
            if key is not None and key in _FACTORIES and key not in found:
                found.append(key)
        return found

    def _plan(self, items: list[pytest.Item]) -> None:
        if self._first_use is not None:
            return
        self._index = {item.nodeid: i for i, item in enumerate(items)}
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.path.name in self.elsewhere:
                continue
            for key in self.keys(item):
                first.setdefault(key, i)
                self._last_use[key] = i
        self._first_use = sorted((i, key) for key, i in first.items())

    def release(self, item: pytest.Item) -> None:
        """After ``item``: stop the servers no later test uses (a session server's fixture would
        keep it to the session's end; its own stop then does nothing). Their memory goes to the
        next look-ahead starts."""
        self._plan(item.session.items)
        here = self._index.get(item.nodeid, -1)
        for key, obj in list(self._live.items()):
            # a configuration not planned here (another worker's file this one took up at the
            # end) keeps its fixture's own stop
            if key in self._last_use and self._last_use[key] <= here:
                for server in _servers(obj):
                    server.stop()
                del self._live[key]

    def launch_own(self, item: pytest.Item) -> None:
        """Before ``item``'s fixtures: launch together the configurations it needs that are not
        up or starting (its fixtures would start them one after the other)."""
        missing = [key for key in self.keys(item)
                   if key not in self._taken and key not in self._pending]
        if len(missing) > 1:
            for key in missing:
                self.prestart(key)

    def _room_for(self, key: str) -> bool:
        # launched servers grow for a while: count the pending ones at their full size
        starting = sum(_SIZES[k] for k in self._pending)
        return _available_gib() >= (starting + _SIZES[key]) * SERVER_GIB + SPARE_GIB

    def look_ahead_keys(self, keys: list[str]) -> None:
        """Launch the first of ``keys`` not up or starting (one at a time, memory
        permitting)."""
        if self._pending:
            return
        for key in keys:
            if key not in self._taken:
                if self._room_for(key):
                    self.prestart(key)
                return

    def look_ahead(self, item: pytest.Item) -> None:
        """Before ``item`` runs: launch the next configuration a later test uses (one at a time,
        memory permitting)."""
        self._plan(item.session.items)
        assert self._first_use is not None
        if len(self._pending) >= MAX_PENDING:
            return
        here = self._index.get(item.nodeid, -1)
        for i, key in self._first_use:
            if i <= here or key in self._taken or key in self._pending:
                continue
            if self._room_for(key):
                self.prestart(key)
            return


_POOL: Pool | None = None


def pool(config: pytest.Config) -> Pool:
    """The session's pool."""
    global _POOL
    if _POOL is None or _POOL.config is not config:
        _POOL = Pool(config)
    return _POOL


def log_dir() -> Path:
    """Where the servers' logs go (``TOKENPRUNE_TEST_LOGS``)."""
    d = Path(os.environ.get("TOKENPRUNE_TEST_LOGS", "/tmp/vllm-tokenprune-test-logs"))
    d.mkdir(parents=True, exist_ok=True)
    return d
