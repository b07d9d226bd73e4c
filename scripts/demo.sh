#!/usr/bin/env bash
# The demo on a fresh machine: a real local control plane, the CRDs, the operator, an example
# Pool and three Subscriptions, shown as they move from funding to active with their keys.
#   scripts/demo.sh        start (or re-use) everything and show the progression
#   scripts/demo.sh down   stop the operator and the control plane
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/.demo"
mkdir -p "$DEMO"

stop() {
  if [ -f "$DEMO/operator.pid" ]; then kill "$(cat "$DEMO/operator.pid")" 2>/dev/null || true; fi
  rm -f "$DEMO/operator.pid"
  [ -x .venv/bin/python ] && .venv/bin/python -m gpupool.devcluster down --dir "$DEMO/cluster" || true
}
if [ "${1:-}" = "down" ]; then stop; echo "demo stopped"; exit 0; fi

bash scripts/setup.sh

if [ ! -f "$DEMO/cluster/ready" ] || ! kubectl --kubeconfig "$DEMO/cluster/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
  stop
  rm -rf "$DEMO/cluster"
  nohup .venv/bin/python -m gpupool.devcluster up --dir "$DEMO/cluster" --gpu-nodes 2 --gpus-per-node 8 \
    >"$DEMO/cluster.log" 2>&1 &
  for _ in $(seq 1 120); do [ -f "$DEMO/cluster/ready" ] && break; sleep 1; done
  [ -f "$DEMO/cluster/ready" ] || { tail -n 30 "$DEMO/cluster.log"; exit 1; }
fi
export KUBECONFIG="$DEMO/cluster/kubeconfig"
echo "== control plane up: KUBECONFIG=$KUBECONFIG"
kubectl get nodes

kubectl apply -f crds/
kubectl wait --for condition=established --timeout=60s crd/pools.gpupool.dev crd/subscriptions.gpupool.dev

if [ ! -f "$DEMO/operator.pid" ] || ! kill -0 "$(cat "$DEMO/operator.pid")" 2>/dev/null; then
  nohup .venv/bin/gpupool operator >"$DEMO/operator.log" 2>&1 &
  echo $! >"$DEMO/operator.pid"
fi
echo "== operator running (log: $DEMO/operator.log)"

kubectl apply -f examples/pool.yaml
kubectl wait --for=jsonpath='{.status.phase}'=funding pool/qwen3-8b --timeout=60s 2>/dev/null || true
echo "== the pool is funding: it activates at 6 pledged seat-blocks"
kubectl get pools

kubectl apply -f examples/subscriptions.yaml -l demo-step=first
for _ in $(seq 1 30); do
  [ "$(kubectl get pool qwen3-8b -o jsonpath='{.status.pledgedSlots}')" = "3" ] && break
  sleep 1
done
echo "== two customers pledged 3 seat-blocks: the reservation fee is charged, the pool keeps funding"
kubectl get pools,subscriptions

kubectl apply -f examples/subscriptions.yaml -l demo-step=second
for _ in $(seq 1 60); do
  phases=$(kubectl get subscriptions -o jsonpath='{.items[*].status.phase}')
  [ "$phases" = "active active active" ] && break
  sleep 1
done
echo "== pledges reached the threshold: vLLM scaled up, the pool is active, every pledge got a key"
kubectl get pools,subscriptions,deployments
echo
echo "== key Secrets (the gate label says which keys work in the current UTC block)"
kubectl get secrets -l gpupool.dev/kind=api-key -L gpupool.dev/gate,gpupool.dev/subscription
echo
echo "Explore with: export KUBECONFIG=$KUBECONFIG; kubectl describe subscription acme-americas"
echo "Stop with:    scripts/demo.sh down"
