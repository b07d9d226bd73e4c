#!/usr/bin/env bash
# Install LiteLLM's proxy into a venv of its own (never the project's .venv) for the gateway
# benchmark (benchmarks/gateway_bench.py). Cached: a second run only checks the stamp.
#   GPUPOOL_CACHE   cache root (default ~/.cache/gpupool); the venv is $GPUPOOL_CACHE/litellm-venv
#   LITELLM_VERSION pinned version of litellm[proxy] (default below)
set -euo pipefail
CACHE="${GPUPOOL_CACHE:-$HOME/.cache/gpupool}"
VENV="$CACHE/litellm-venv"
VERSION="${LITELLM_VERSION:-1.81.0}"
STAMP="$VENV/.gpupool-litellm-$VERSION"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import litellm.proxy.proxy_server" >/dev/null 2>&1; then
  echo "litellm: cached in $VENV ($VERSION)"
  exit 0
fi
mkdir -p "$CACHE"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
echo "litellm: installing litellm[proxy]==$VERSION into $VENV"
"$VENV/bin/pip" install -q "litellm[proxy]==$VERSION"
"$VENV/bin/python" -c "import litellm.proxy.proxy_server" >/dev/null
touch "$STAMP"
echo "litellm: installed into $VENV ($VERSION)"
