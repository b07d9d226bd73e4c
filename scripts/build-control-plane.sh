#!/usr/bin/env bash
# Build (or re-use) kube-apiserver, kube-controller-manager and kube-scheduler from Debian's
# kubernetes source package, with etcd from Debian. Cached under $GPUPOOL_CACHE (default
# ~/.cache/gpupool); a second run only checks the cache.
set -euo pipefail

CACHE="${GPUPOOL_CACHE:-$HOME/.cache/gpupool}"
BIN="$CACHE/k8s/bin"
WANT=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
  [ -f "$BIN/.ok" ] || return 1   # written last, after every binary is in place
  for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  command -v etcd >/dev/null
}

if have_all; then
  echo "control plane: cached in $BIN"
  exit 0
fi

# One build at a time (setup.sh, a demo and a test run may all call this): wait for a running
# one, then re-check the cache.
mkdir -p "$CACHE/k8s"
exec 9>"$CACHE/k8s/.build.lock"
if ! flock -n 9; then
  echo "control plane: another build is running; waiting for it"
  flock 9
fi
if have_all; then
  echo "control plane: cached in $BIN"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SRC_LIST=/etc/apt/sources.list.d/gpupool-deb-src.sources
if [ ! -f "$SRC_LIST" ]; then
  cat >"$SRC_LIST" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev >/dev/null

WORK="$CACHE/k8s/src"
mkdir -p "$WORK" "$BIN"
cd "$WORK"
if ! ls -d kubernetes-*/ >/dev/null 2>&1; then
  apt-get source --download-only kubernetes
  tar xf kubernetes_*.orig.tar.* 2>/dev/null || true
  dsc=$(ls kubernetes_*.dsc | head -n1)
  dpkg-source --skip-patches -x "$dsc" >/dev/null 2>&1 || dpkg-source -x "$dsc" >/dev/null
fi
TREE=$(ls -d "$WORK"/kubernetes-*/ | head -n1)
TREE=${TREE%/}

# reflect2 v1.0.1 segfaults under Go >= 1.18 on the first custom-resource write.
R2="$TREE/vendor/github.com/modern-go/reflect2"
if [ ! -f "$R2/.gpupool-patched" ]; then
  rm -rf "$R2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$R2"
  touch "$R2/.gpupool-patched"
fi

GOPATH_DIR="$CACHE/k8s/gopath"
mkdir -p "$GOPATH_DIR/src/k8s.io"
ln -sfn "$TREE" "$GOPATH_DIR/src/k8s.io/kubernetes"
cd "$GOPATH_DIR/src/k8s.io/kubernetes"
# A failed earlier attempt leaves empty generator binaries behind.
[ -f "$BIN/.ok" ] || rm -rf _output
export GOPATH="$GOPATH_DIR" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$CACHE/k8s/gocache"
unset GOFLAGS
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$CACHE/k8s/build.log" 2>&1 || {
  tail -n 40 "$CACHE/k8s/build.log"; exit 1; }
rm -f "$BIN/.ok"
for b in "${WANT[@]}"; do
  cp "_output/local/bin/linux/amd64/$b" "$BIN/.$b.tmp"
  mv -f "$BIN/.$b.tmp" "$BIN/$b"   # never a half-copied binary under the real name
done
touch "$BIN/.ok"
echo "control plane: built into $BIN"
