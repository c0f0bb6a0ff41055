#!/usr/bin/env bash
# Load benchmark of `slotgate gateway` against its peers, side by side in one interleaved run
# (A B C D A B C D ...). Run by hand, not in CI:  bash benches/load.sh [SECONDS] [REPEATS]
#
#   direct    wrk -> demo upstream
#   bare      wrk -> bare hyper reverse proxy (benches/bare_proxy.rs, no limits) -> upstream
#   nginx     wrk -> nginx (Debian) with limit_conn + limit_req for the same limits -> upstream
#   slotgate  wrk -> slotgate gateway (release, limits in memory) -> upstream
#   redis     wrk -> slotgate gateway --state redis://  (limits shared through redis-server) -> upstream
#   refusal   wrk -> slotgate gateway, key on a 0-slot plan: every answer is a 429
#   nginx-refusal  wrk -> nginx, a limit_req zone of 1 request a minute: every answer is a 429
#   target    wrk -> slotgate gateway, every path routed to an http ApiUpstream that injects a
#             provider key -> upstream (what routing and the target's books cost)
#   https     wrk -> slotgate gateway, every path routed to an https ApiUpstream (test CA) that
#             injects a provider key -> TLS upstream (nginx answering 200 itself)
#   nginx-https    wrk -> nginx, the same limits, proxy_pass https:// with keep-alive, the CA
#             checked and the same header injected -> the same TLS upstream
#   redis-base     (with SLOTGATE_BASELINE=path/to/an/older/slotgate) the older build in redis mode,
#                  on its own key prefix of the same redis-server: an A/B in the same run
#
# For the redis modes the script also reads redis-server's CPU time around each run and prints
# it per request: what a request costs Redis, which shares CPU 0 with the proxy.
# For every target it reads the user and kernel CPU time of the process serving it (the proxy, or
# the upstream for `direct`) and prints both per request, and from them the best a proxy could do
# on this layout with nginx's kernel time and no user-space work at all: where the time goes that
# no user-space change can win back.
#
# The proxy under test and the upstream share CPU 0 and wrk has CPU 1; every proxy and the
# upstream get one worker, so the added CPU per request, 1/rps(proxy) - 1/rps(direct), compares.
# redis-server runs on CPU 0 too: its work is part of what the redis mode costs.
# nginx does what slotgate does to a request: it strips the key header and sets X-Forwarded-For
# and X-Forwarded-Host, so that the upstream (on the same core) parses the same amount either way.
# slotgate and the bare proxy are built with the `dist` profile (fat LTO, one codegen unit), the
# profile the container image is built with.
#
# A second table holds latency at fixed offered rates below capacity (oha, open loop: requests
# evenly paced, and each one's latency counted from when it was due, so that time spent queued
# behind a slow one counts too). At saturation a closed-loop client's latency is mostly the
# queue: 64 connections / throughput by Little's law.
# Needs wrk, oha, nginx and redis-server (apt-get install wrk nginx-light redis-server;
# cargo install oha); installs them when missing (oha builds in about ten minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
REPEATS=${2:-3}
CONNS=64
KEY=sg_bench_Zq8Lp3Rk7Vw2Tn5Xc
ZERO_KEY=sg_bench_zero_Hy4Mb9Qe6Ju1Gd

command -v wrk >/dev/null && command -v nginx >/dev/null && command -v redis-server >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq wrk nginx-light redis-server >/dev/null; }
export PATH="$PATH:$HOME/.cargo/bin"
command -v oha >/dev/null || cargo install oha --locked -q
cargo build --profile dist --locked --bin slotgate --bench bare_proxy -q
BARE=$(ls -t target/dist/deps/bare_proxy-* | grep -v '\.d$' | head -1)
SG=target/dist/slotgate

source benches/common.sh

UP=$(free_port); BARE_P=$(free_port); NGINX_P=$(free_port); SG_P=$(free_port); SG_ADMIN=$(free_port)
REDIS_P=$(free_port); SGR_P=$(free_port); SGR_ADMIN=$(free_port); NGINX_REF_P=$(free_port)
TLS_UP=$(free_port); SGT_P=$(free_port); SGT_ADMIN=$(free_port); SGS_P=$(free_port); SGS_ADMIN=$(free_port)
NGINX_TLS_P=$(free_port)
BASE=${SLOTGATE_BASELINE:-}; BASE_P=$(free_port); BASE_ADMIN=$(free_port)

# Same limits everywhere: 1,000 slots and 1,000,000 req/s per key, so nothing is refused and
# the cost of keeping the books is what is measured.
bench_manifests "$WORK/manifests" "$KEY" "$ZERO_KEY"
"$SG" compile "$WORK/manifests" -o "$WORK/gateway.json" 2>/dev/null
# The same, every path routed to a target: plain http to the demo upstream, or https.
mkdir -p "$WORK/pki" "$WORK/credentials"
test_pki "$WORK/pki"
echo sk-bench-provider > "$WORK/credentials/bench-target"
for mode in target https; do
  cp -r "$WORK/manifests" "$WORK/manifests-$mode"
  case $mode in
    target) target_manifests bench-target "http://127.0.0.1:$UP" ;;
    https) target_manifests bench-target "https://127.0.0.1:$TLS_UP" "$WORK/pki/ca.pem" ;;
  esac >> "$WORK/manifests-$mode/bench.yaml"
  "$SG" compile "$WORK/manifests-$mode" -o "$WORK/gateway-$mode.json" 2>/dev/null
done
cat > "$WORK/tls-up.conf" <<EOF
$(nginx_conf_head tls-up)
  server {
    listen 127.0.0.1:$TLS_UP ssl;
    ssl_certificate $WORK/pki/leaf.pem;
    ssl_certificate_key $WORK/pki/leaf.key;
    keepalive_requests 100000000;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOF

cat > "$WORK/nginx.conf" <<EOF
$(nginx_conf_head nginx)
$(nginx_limit_zones $UP)
$(nginx_limited_server $NGINX_P)
  upstream tlsup { server 127.0.0.1:$TLS_UP; keepalive 256; }
$(nginx_limited_server $NGINX_TLS_P https://tlsup "      proxy_ssl_trusted_certificate $WORK/pki/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;
      proxy_set_header Authorization \"Bearer sk-bench-provider\";")
  limit_req_zone \$http_x_api_key zone=none:1m rate=1r/m;
  server {
    listen 127.0.0.1:$NGINX_REF_P;
    location / {
      limit_req zone=none;
      limit_req_status 429;
      proxy_pass http://up;
    }
  }
}
EOF

# The process that does each target's work, by name: its CPU time is read around each run.
declare -A PID
taskset -c 0 "$SG" demo-upstream --listen 127.0.0.1:$UP --worker-threads 1 >/dev/null 2>&1 & PIDS+=($!)
PID[direct]=$!
taskset -c 0 "$BARE" 127.0.0.1:$BARE_P http://127.0.0.1:$UP 1 >/dev/null 2>&1 & PIDS+=($!)
PID[bare]=$!
taskset -c 0 nginx -c "$WORK/nginx.conf" >/dev/null 2>&1 & PIDS+=($!)
SLOTGATE_LOG=warn taskset -c 0 "$SG" gateway --config "$WORK/gateway.json" --upstream http://127.0.0.1:$UP \
  --listen 127.0.0.1:$SG_P --admin-listen 127.0.0.1:$SG_ADMIN --worker-threads 1 >/dev/null 2>&1 & PIDS+=($!)
PID[slotgate]=$! PID[refusal]=$!
taskset -c 0 redis-server --port $REDIS_P --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 & PIDS+=($!)
REDIS_PID=$!
wait_port $REDIS_P
SLOTGATE_LOG=warn taskset -c 0 "$SG" gateway --config "$WORK/gateway.json" --upstream http://127.0.0.1:$UP \
  --listen 127.0.0.1:$SGR_P --admin-listen 127.0.0.1:$SGR_ADMIN --worker-threads 1 \
  --state redis://127.0.0.1:$REDIS_P >/dev/null 2>&1 & PIDS+=($!)
PID[redis]=$!
taskset -c 0 nginx -c "$WORK/tls-up.conf" >/dev/null 2>&1 & PIDS+=($!)
for mode in target:$SGT_P:$SGT_ADMIN https:$SGS_P:$SGS_ADMIN; do
  IFS=: read -r m port admin <<<"$mode"
  SLOTGATE_LOG=warn taskset -c 0 "$SG" gateway --config "$WORK/gateway-$m.json" --upstream http://127.0.0.1:$UP \
    --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin --worker-threads 1 \
    --target-credentials "$WORK/credentials" >/dev/null 2>&1 & PIDS+=($!)
  PID[$m]=$!
done
TARGETS="direct:$UP:$KEY bare:$BARE_P:$KEY nginx:$NGINX_P:$KEY slotgate:$SG_P:$KEY redis:$SGR_P:$KEY"
TARGETS+=" refusal:$SG_P:$ZERO_KEY nginx-refusal:$NGINX_REF_P:$ZERO_KEY"
TARGETS+=" target:$SGT_P:$KEY https:$SGS_P:$KEY nginx-https:$NGINX_TLS_P:$KEY"
if [ -n "$BASE" ]; then
  SLOTGATE_LOG=warn taskset -c 0 "$BASE" gateway --config "$WORK/gateway.json" --upstream http://127.0.0.1:$UP \
    --listen 127.0.0.1:$BASE_P --admin-listen 127.0.0.1:$BASE_ADMIN --worker-threads 1 \
    --state redis://127.0.0.1:$REDIS_P --state-prefix base >/dev/null 2>&1 & PIDS+=($!)
  PID[redis-base]=$!
  TARGETS+=" redis-base:$BASE_P:$KEY"
fi
for t in $TARGETS; do IFS=: read -r _ port _ <<<"$t"; wait_port "$port"; done
# nginx's requests are served by its one worker, not by the master started above.
PID[nginx]=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)
PID[nginx-refusal]=${PID[nginx]} PID[nginx-https]=${PID[nginx]}

# redis-server's CPU time so far, in clock ticks.
redis_ticks() { awk '{print $14 + $15}' "/proc/$REDIS_PID/stat"; }
# A process's user and system CPU time so far, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# One run of target $3: prints "rps p50_ms p99_ms non2xx redis_us_per_request user_us sys_us",
# the last two the CPU time a request of the process that serves the target (the proxy; the
# upstream itself for `direct`), in user space and in the kernel.
run() {
  local port=$1 key=$2 name=$3 out t0 t1 u0 s0 u1 s1
  t0=$(redis_ticks)
  read -r u0 s0 < <(cpu_ticks "${PID[$name]}")
  out=$(taskset -c 1 wrk -t1 -c$CONNS -d"${SECS}s" --latency -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/bench")
  read -r u1 s1 < <(cpu_ticks "${PID[$name]}")
  t1=$(redis_ticks)
  awk -v o="$out" -v ticks=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v user=$((u1 - u0)) -v sys=$((s1 - s0)) 'BEGIN {
    n = split(o, L, "\n"); rps = 0; p50 = ""; p99 = ""; bad = 0; total = 0
    for (i = 1; i <= n; i++) {
      split(L[i], f, " ")
      if (L[i] ~ /^Requests\/sec:/) rps = f[2]
      if (L[i] ~ /^ +50%/) p50 = f[2]
      if (L[i] ~ /^ +99%/) p99 = f[2]
      if (L[i] ~ /Non-2xx/) bad = f[5]
      if (L[i] ~ / requests in /) total = f[1]
    }
    per = total > 0 ? 1e6 / hz / total : 0
    printf "%s %s %s %s %.2f %.2f %.2f\n", rps, ms(p50), ms(p99), bad, ticks * per, user * per, sys * per
  }
  function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }'
}

# Warm every path once (connection pools, page cache).
for t in $TARGETS; do
  IFS=: read -r _ port key <<<"$t"
  taskset -c 1 wrk -t1 -c$CONNS -d1s -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/bench" >/dev/null
done

RESULTS="$WORK/results"
for rep in $(seq "$REPEATS"); do
  for t in $TARGETS; do
    IFS=: read -r name port key <<<"$t"
    line=$(run "$port" "$key" "$name")
    echo "$rep $name $line" | tee -a "$RESULTS" >&2
  done
done

# Fixed rate, open loop: prints "p50_ms p99_ms p99.9_ms achieved_rps" for one run.
paced() {
  taskset -c 1 oha -z "${SECS}s" -c $CONNS -q "$2" --latency-correction --no-tui --output-format json \
    -H "X-API-Key: $KEY" "http://127.0.0.1:$1/v1/bench" | python3 -c '
import json, sys
d = json.load(sys.stdin); p = d["latencyPercentiles"]
print("%.2f %.2f %.2f %.0f" % (p["p50"] * 1e3, p["p99"] * 1e3, p["p99.9"] * 1e3, d["summary"]["requestsPerSec"]))'
}
PACED="$WORK/paced"
# 20,000 req/s is past the redis mode's capacity on this layout, so it runs at 10,000 only.
for rep in $(seq "$REPEATS"); do
  for t in 10000:direct:$UP 10000:nginx:$NGINX_P 10000:slotgate:$SG_P 10000:redis:$SGR_P \
    20000:direct:$UP 20000:nginx:$NGINX_P 20000:slotgate:$SG_P; do
    IFS=: read -r rate name port <<<"$t"
    echo "$rep $rate $name $(paced "$port" "$rate")" | tee -a "$PACED" >&2
  done
done

python3 - "$RESULTS" "$SECS" "$REPEATS" "$CONNS" "$PACED" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for rep, name, rps, p50, p99, bad, redis_us, user_us, sys_us in rows:
    by.setdefault(name, []).append((float(rps), float(p50), float(p99), int(bad), float(redis_us),
                                    float(user_us), float(sys_us)))
med = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
           statistics.median(r[2] for r in v), sum(r[3] for r in v),
           statistics.median(r[4] for r in v), statistics.median(r[5] for r in v),
           statistics.median(r[6] for r in v)) for n, v in by.items()}
d = med["direct"][0]
print(f"\n{sys.argv[3]} interleaved repeats of {sys.argv[2]} s, {sys.argv[4]} connections, medians:\n")
print("| target | req/s | p50 ms | p99 ms | non-2xx | added CPU/request (us) | proxy user/request (us) | proxy kernel/request (us) | redis CPU/request (us) | vs nginx | vs bare | vs memory |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
order = ["direct", "bare", "nginx", "slotgate", "redis", "redis-base", "refusal", "nginx-refusal",
         "target", "https", "nginx-https"]
for n in (n for n in order if n in med):
    rps, p50, p99, bad, redis_us, user_us, sys_us = med[n]
    added = "" if n == "direct" else f"{(1/rps - 1/d) * 1e6:.1f}"
    peer = {"refusal": "nginx-refusal", "https": "nginx-https"}.get(n, "nginx")
    vn = f"{rps / med[peer][0]:.2f}x" if n not in ("nginx", "nginx-refusal", "nginx-https") else ""
    vb = f"{rps / med['bare'][0]:.2f}x" if n not in ("bare", "refusal", "nginx-refusal", "https", "nginx-https") else ""
    vm = f"{rps / med['slotgate'][0]:.2f}x" if n.startswith("redis") or n == "target" else ""
    ru = f"{redis_us:.2f}" if n.startswith("redis") else ""
    print(f"| {n} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {bad} | {added} | {user_us:.2f} | {sys_us:.2f} | {ru} | {vn} | {vb} | {vm} |")
m, r = med["slotgate"], med["redis"]
print(f"\nredis mode: {r[0] / m[0]:.2f}x memory mode's throughput, p99 {r[2] - m[2]:+.2f} ms over memory mode (saturated)")
if "redis-base" in med:
    b = med["redis-base"]
    print(f"redis mode, baseline build: {b[0] / m[0]:.2f}x memory mode; this build {r[0] / b[0]:.2f}x the baseline, redis CPU {r[4]:.2f} against {b[4]:.2f} us a request")
print(f"memory mode: {m[0] / med['nginx'][0]:.2f}x nginx's throughput, p99 {m[2]:.2f} against nginx's {med['nginx'][2]:.2f} ms")
# CPU 0 is saturated and runs everything a request costs on it: the proxy's user and kernel time,
# the upstream's, the interrupts. A proxy that did what nginx does in the kernel (the same four
# system calls) and nothing at all in user space would save nginx's user time and no more: the
# ceiling on this layout, whatever the proxy's code.
n = med["nginx"]
ceiling = 1e6 / (1e6 / n[0] - n[5])
print(f"ceiling on this layout for a proxy with nginx's kernel time and no user-space work: {ceiling:,.0f} req/s, "
      f"{ceiling / n[0]:.2f}x nginx (CPU 0 spends {1e6 / n[0]:.1f} us a request behind nginx, {n[5]:.2f} of them nginx's user time)")
print(f"refusals: {med['refusal'][0] / med['nginx-refusal'][0]:.2f}x nginx's refusal rate")
t, h, nh = med["target"], med["https"], med["nginx-https"]
print(f"http target: {t[0] / m[0]:.2f}x memory mode without targets; https target: {h[0]:,.0f} req/s, {h[0] / nh[0]:.2f}x nginx's https upstream, p99 {h[2]:.2f} against {nh[2]:.2f} ms")

paced = {}
for rep, rate, name, p50, p99, p999, got in (l.split() for l in open(sys.argv[5])):
    paced.setdefault((int(rate), name), []).append((float(p50), float(p99), float(p999), float(got)))
print("\nLatency at fixed offered rates (oha, open loop, latency from each request's due time), medians:\n")
print("| rate | target | achieved req/s | p50 ms | p99 ms | p99.9 ms | p99 added over direct (ms) |")
print("|---:|---|---:|---:|---:|---:|---:|")
for (rate, n), v in sorted(paced.items(), key=lambda kv: (kv[0][0], ["direct", "nginx", "slotgate", "redis"].index(kv[0][1]))):
    p50, p99, p999, got = (statistics.median(r[i] for r in v) for i in range(4))
    direct = statistics.median(r[1] for r in paced[(rate, "direct")])
    added = "" if n == "direct" else f"{p99 - direct:+.2f}"
    print(f"| {rate:,} | {n} | {got:,.0f} | {p50:.2f} | {p99:.2f} | {p999:.2f} | {added} |")
PY
