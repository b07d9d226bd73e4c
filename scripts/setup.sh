#!/usr/bin/env bash
# Prepare a fresh machine for gpupool's demo and tests: Debian packages, the project's virtualenv,
# the local control plane binaries and helm. Every step re-uses what an earlier run left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

need_apt=()
for pkg_cmd in faketime:faketime redis-server:redis-server etcd-server:etcd jq:jq rsync:rsync golang-go:go; do
  pkg=${pkg_cmd%%:*}; cmd=${pkg_cmd##*:}
  command -v "$cmd" >/dev/null || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.gpupool-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the project into .venv"
  .venv/bin/pip install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  touch "$stamp"
fi

bash scripts/build-control-plane.sh
bash scripts/get-helm.sh
