#!/usr/bin/env bash
# Abuse protection benchmarks, run by hand (not in CI):  bash benches/abuse.sh [SECONDS] [REPEATS] [SOURCES]
#
# 1. CPU per request of the banned path against the plain 429 path, interleaved (A B A B ...):
#      refusal  wrk -> gateway, key on a 0-slot plan (with a per-endpoint rate limit, as plans
#               have) and no abuse policy: every answer is a 429 concurrency_limit_exceeded
#      banned   wrk -> gateway, key on a 0-slot plan whose first refusal bans the address: every
#               answer is a 429 temporarily_blocked
#    The gateway (one worker) has CPU 0, wrk CPU 1; the gateway's user+system CPU over the run,
#    divided by the requests wrk completed, is the cost of one answer.
# 2. A spray of one request each from SOURCES distinct addresses (default 1,000,000) with
#    unknown keys, and ten heavy hitters among them sending 100 each: the gateway's RSS and its
#    ban table before and after, and whether every heavy hitter was banned.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
REPEATS=${2:-3}
SOURCES=${3:-1000000}
ZERO_KEY=sg_bench_zero_Hy4Mb9Qe6Ju1Gd
BAN_KEY=sg_bench_ban_Wc5Nq2Lr8Tz3Ke

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked --bin slotgate --bench spray -q
SPRAY=$(ls -t target/release/deps/spray-* | grep -v '\.d$' | head -1)
SG=target/release/slotgate

source benches/common.sh

mkdir -p "$WORK/manifests"
cat > "$WORK/manifests/bench.yaml" <<EOF
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: zero}
spec:
  concurrency: {maxConcurrentRequests: 0, paths: ["/*"]}
  rateLimit: {requestsPerSecond: 1000000, burst: 1000000, per: Endpoint, paths: ["/*"]}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: banning}
spec:
  concurrency: {maxConcurrentRequests: 0, paths: ["/*"]}
  rateLimit: {requestsPerSecond: 1000000, burst: 1000000, per: Endpoint, paths: ["/*"]}
  abuse: {refusals: 1, window: 10s, banDuration: 1h, maxBanDuration: 1h}
EOF
{ key_manifest zero zero "$ZERO_KEY"; key_manifest ban banning "$BAN_KEY"; } >> "$WORK/manifests/bench.yaml"
"$SG" compile "$WORK/manifests" -o "$WORK/gateway.json" 2>/dev/null
# Nothing reaches the upstream in either part; a closed port is enough.
NOWHERE=http://127.0.0.1:$(free_port)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
code_of() { curl -s "http://127.0.0.1:$1/v1/x" -H "Authorization: Bearer $2" | sed -n 's/.*"code":"\([a-z_]*\)".*/\1/p'; }

P=$(free_port); A=$(free_port)
taskset -c 0 "$SG" gateway --config "$WORK/gateway.json" --upstream "$NOWHERE" --listen "127.0.0.1:$P" \
  --admin-listen "127.0.0.1:$A" --worker-threads 1 >"$WORK/gw.out" 2>"$WORK/gw.err" &
GW=$!; PIDS+=("$GW"); wait_port "$P"; wait_port "$A"
HZ=$(getconf CLK_TCK)

run() { # name key -> "name rps us_per_request"
  local before after out reqs
  before=$(cpu_ticks "$GW")
  out=$(taskset -c 1 wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:$P/v1/x" -H "Authorization: Bearer $2")
  after=$(cpu_ticks "$GW")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$1 $(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')"
}

echo "== CPU per answer, ${SECS}s x ${REPEATS}, gateway on CPU 0 (1 worker), wrk -c64 on CPU 1"
printf "%-8s %12s %14s %s\n" scenario req/s "gateway us/req" code
for r in $(seq "$REPEATS"); do
  curl -s -X DELETE "http://127.0.0.1:$A/bans/ip:127.0.0.1" >/dev/null
  c=$(code_of "$P" "$ZERO_KEY")
  read -r name rps us < <(run refusal "$ZERO_KEY")
  printf "%-8s %12s %14s %s\n" "$name" "$rps" "$us" "$c"
  code_of "$P" "$BAN_KEY" >/dev/null   # the first refusal starts the ban
  c=$(code_of "$P" "$BAN_KEY")
  read -r name rps us < <(run banned "$BAN_KEY")
  printf "%-8s %12s %14s %s\n" "$name" "$rps" "$us" "$c"
done
kill "$GW"; wait "$GW" 2>/dev/null || true

# The same two answers under callgrind: user-space instructions per request, free of the noise
# of a shared host (the kernel's part, the same for both, is not counted).
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
cat > "$WORK/send.py" <<'EOF'
import http.client, sys
port, token, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    c.request("GET", "/v1/x", headers={"Authorization": "Bearer " + token})
    c.getresponse().read()
EOF
instructions() { # token requests -> total Ir of a gateway that answered them
  local p a vg
  p=$(free_port); a=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$SG" gateway --config "$WORK/gateway.json" \
    --upstream "$NOWHERE" --listen "127.0.0.1:$p" --admin-listen "127.0.0.1:$a" --worker-threads 1 >/dev/null 2>&1 &
  vg=$!
  for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$p") 2>/dev/null && break; sleep 0.1; done
  python3 "$WORK/send.py" "$p" "$1" "$2"
  kill -INT "$vg"; wait "$vg" 2>/dev/null || true
  awk '/^summary:/ {print $2}' "$WORK/cg.out"
}
N=20000
base=$(instructions "$ZERO_KEY" 1)
ref=$(instructions "$ZERO_KEY" $((N + 1)))
ban=$(instructions "$BAN_KEY" $((N + 1)))
echo
echo "== callgrind, user-space instructions per answer ($N requests on one keep-alive connection)"
awk -v b="$base" -v r="$ref" -v x="$ban" -v n="$N" 'BEGIN {
  printf "refusal  %8.0f\nbanned   %8.0f  (%.2fx the refusal)\n", (r - b) / n, (x - b) / n, (x - b) / (r - b) }'

echo
echo "== spray: $SOURCES addresses with one unknown key each, 10 heavy hitters sending 100 each"
P=$(free_port); A=$(free_port)
"$SG" gateway --config "$WORK/gateway.json" --upstream "$NOWHERE" --listen "127.0.0.1:$P" \
  --admin-listen "127.0.0.1:$A" >"$WORK/gw2.out" 2>"$WORK/gw2.err" &
GW=$!; PIDS+=("$GW"); wait_port "$P"; wait_port "$A"
rss0=$(rss_kib "$GW")
"$SPRAY" "127.0.0.1:$P" "$SOURCES" 10 100 256
curl -s "http://127.0.0.1:$A/metrics" >/dev/null   # let the sweep run at least once more
sleep 6
rss1=$(rss_kib "$GW")
table=$(curl -s "http://127.0.0.1:$A/metrics" | awk '/^slotgate_ban_table_bytes / {print $2}')
heavy=$(curl -s "http://127.0.0.1:$A/bans" | python3 -c '
import json, sys
bans = [b["subject"] for b in json.load(sys.stdin)["bans"]]
heavy = ["ip:127.0.0.%d" % i for i in range(2, 12)]
print("%d of 10 heavy hitters banned, %d bans in all" % (sum(h in bans for h in heavy), len(bans)))')
echo "gateway RSS: $((rss0 / 1024)) MiB idle -> $((rss1 / 1024)) MiB after the spray (+$(((rss1 - rss0) / 1024)) MiB)"
echo "ban table: $((table / 1048576)) MiB ($table bytes); $heavy"
