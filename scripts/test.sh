#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up (cached after the first run), lint, type-check,
# then every unit and integration test against the real local control plane.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s)
bash scripts/setup.sh
bash scripts/setup-vllm.sh
echo "setup: $(( $(date +%s) - t0 ))s"

# Core tests never skip for a missing part: a missing part is a failure.
export GPUPOOL_REQUIRE_CLUSTER=1 GPUPOOL_REQUIRE_VLLM=1 GPUPOOL_REQUIRE_STRIPE=1
export GPUPOOL_TEST_LOGS="${GPUPOOL_TEST_LOGS:-$(mktemp -d /tmp/gpupool-test-logs.XXXXXX)}"

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -p no:cacheprovider -ra "${@:-tests}"
echo "tests: $(( $(date +%s) - t0 ))s in all"
