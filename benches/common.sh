# Sourced by the load scripts in this folder: a scratch folder and the processes started, both
# cleaned up on exit however the script ends, and loopback ports the OS picks.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# The benchmarks' manifests in folder $1: plan `bench` (1,000 slots and 1,000,000 req/s, so that
# nothing is refused and the cost of keeping the books is what is measured) with key token $2,
# and plan `zero` (no slots: every answer is a 429) with key token $3.
bench_manifests() {
  mkdir -p "$1"
  cat > "$1/bench.yaml" <<EOF
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: bench}
spec:
  concurrency: {maxConcurrentRequests: 1000, paths: ["/*"]}
  rateLimit: {requestsPerSecond: 1000000, burst: 1000000, per: Key, paths: ["/*"]}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: zero}
spec:
  concurrency: {maxConcurrentRequests: 0, paths: ["/*"]}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiKey
metadata: {name: bench, namespace: default}
spec: {plan: bench}
---
apiVersion: v1
kind: Secret
metadata: {name: bench-token, namespace: default}
stringData: {token: $2}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiKey
metadata: {name: zero, namespace: default}
spec: {plan: zero}
---
apiVersion: v1
kind: Secret
metadata: {name: zero-token, namespace: default}
stringData: {token: $3}
EOF
}
