#!/usr/bin/env bash
# What a hot reload costs the requests in flight: latency at a fixed offered rate (oha, open
# loop) while the gateway's configuration of KEYS keys is replaced twice, side by side with the
# same run without a reload. Run by hand, not in CI:  bash benches/reload.sh [KEYS] [RATE] [SECONDS]
#
# Each replacement changes a plan's slot count, so the key table is rebuilt and every key's live
# state carried over: the whole of a reload. The gateway and the upstream share CPU 0 with one
# worker each (the reload's own thread too), oha has CPU 1. SG=path/to/slotgate measures
# another build.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-100000}
RATE=${2:-2000}
SECS=${3:-12}
KEY=sg_bench_Zq8Lp3Rk7Vw2Tn5Xc
export PATH="$PATH:$HOME/.cargo/bin"
command -v oha >/dev/null || cargo install oha --locked -q
if [ -z "${SG:-}" ]; then
  cargo build --release --locked --bin slotgate -q
  SG=target/release/slotgate
fi

source benches/common.sh

# One plan, KEYS keys on it, and the bench key; a second folder differs in the plan's slots.
mkdir -p "$WORK/a" "$WORK/b" "$WORK/live"
python3 - "$WORK/a/keys.yaml" "$KEYS" "$KEY" <<'EOF'
import sys
path, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "w") as f:
    f.write("apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata: {name: bench}\n"
            "spec:\n  concurrency: {maxConcurrentRequests: 1000, paths: [\"/*\"]}\n")
    keys = [("bench", key)] + [(f"k{i}", f"tok-{i}-reload-bench") for i in range(n)]
    for name, token in keys:
        f.write(f"---\napiVersion: slotgate.dev/v1alpha1\nkind: ApiKey\n"
                f"metadata: {{name: {name}, namespace: default}}\nspec: {{plan: bench}}\n"
                f"---\napiVersion: v1\nkind: Secret\n"
                f"metadata: {{name: {name}-token, namespace: default}}\nstringData: {{token: {token}}}\n")
EOF
sed 's/maxConcurrentRequests: 1000,/maxConcurrentRequests: 999,/' "$WORK/a/keys.yaml" > "$WORK/b/keys.yaml"
"$SG" compile "$WORK/a" -o "$WORK/a.json" 2>/dev/null
"$SG" compile "$WORK/b" -o "$WORK/b.json" 2>/dev/null
cp "$WORK/a.json" "$WORK/live/gateway.json"

UP=$(free_port); GW=$(free_port); ADMIN=$(free_port)
taskset -c 0 "$SG" demo-upstream --listen 127.0.0.1:$UP --worker-threads 1 >/dev/null 2>&1 & PIDS+=($!)
NO_COLOR=1 SLOTGATE_LOG=info taskset -c 0 "$SG" gateway --config "$WORK/live/gateway.json" \
  --upstream http://127.0.0.1:$UP --listen 127.0.0.1:$GW --admin-listen 127.0.0.1:$ADMIN \
  --worker-threads 1 >/dev/null 2>"$WORK/gateway.log" & PIDS+=($!)
for _ in $(seq 600); do curl -sf http://127.0.0.1:$ADMIN/readyz >/dev/null && break; sleep 0.1; done

swap() { cp "$1" "$WORK/live/next.json" && mv "$WORK/live/next.json" "$WORK/live/gateway.json"; }
run() { # $1: with or without reloads
  local swapper=""
  if [ "$1" = reload ]; then
    (sleep "$(echo "$SECS/3" | bc -l)"; swap "$WORK/b.json"; sleep "$(echo "$SECS/3" | bc -l)"; swap "$WORK/a.json") &
    swapper=$!
  fi
  taskset -c 1 oha -z "${SECS}s" -c 16 -q "$RATE" --latency-correction --no-tui --output-format json \
    -H "X-API-Key: $KEY" "http://127.0.0.1:$GW/v1/reload" > "$WORK/oha.json"
  [ -z "$swapper" ] || wait "$swapper"
  python3 - "$WORK/oha.json" "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1])); p = d["latencyPercentiles"]; s = d["summary"]
codes = d.get("statusCodeDistribution", {})
print(f"| {sys.argv[2]} | {s['requestsPerSec']:,.0f} | {p['p50']*1e3:.2f} | {p['p99']*1e3:.2f} | "
      f"{p['p99.9']*1e3:.2f} | {s['slowest']*1e3:.2f} | {sum(v for k, v in codes.items() if k != '200')} |")
EOF
}
echo "$KEYS keys, $RATE req/s offered, $SECS s per run; the reload runs replace the configuration twice"
echo
echo "| run | req/s | p50 ms | p99 ms | p99.9 ms | max ms | non-200 |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for _ in 1 2; do run quiet; run reload; done
echo
echo "reloads (gateway log): $(sed 's/\x1b\[[0-9;]*m//g' "$WORK/gateway.log" | grep -o 'elapsed_ms=[0-9.]*' | tail -n +2 | cut -d= -f2 | xargs printf '%.0f ms ')"
