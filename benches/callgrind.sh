#!/usr/bin/env bash
# Instruction counts per request of `slotgate gateway`, by stage, under valgrind's callgrind:
# noise-free on a shared host, where wall-clock figures move by 10% from one run to the next.
# Run by hand:  bash benches/callgrind.sh [SECONDS]
#
# The gateway runs under callgrind with instrumentation off until the warm-up is over; then wrk
# sends SECONDS of traffic with 8 connections and the total instructions are divided by the
# requests answered. The demo upstream runs natively, so only the gateway's own work counts.
# Kernel time (syscalls, loopback TCP) is not in the counts: callgrind sees user space only.
# nginx (one worker, `limit_conn` + `limit_req`, the same rewrite as in load.sh) is counted the
# same way, for the figure to compare against.
# Needs valgrind, wrk, nginx and redis-server (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
KEY=sg_bench_Zq8Lp3Rk7Vw2Tn5Xc
ZERO_KEY=sg_bench_zero_Hy4Mb9Qe6Ju1Gd
command -v wrk >/dev/null && command -v valgrind >/dev/null && command -v redis-server >/dev/null \
  && command -v nginx >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq wrk valgrind redis-server nginx-light >/dev/null; }
# Line tables let callgrind_annotate name inlined frames; a target folder of its own keeps the
# release binaries the load benchmark uses as they are.
export CARGO_PROFILE_DIST_DEBUG=line-tables-only CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/profile}
cargo build --profile dist --locked --bin slotgate -q
SG=$CARGO_TARGET_DIR/dist/slotgate

source benches/common.sh
bench_manifests "$WORK/manifests" "$KEY" "$ZERO_KEY"
"$SG" compile "$WORK/manifests" -o "$WORK/gateway.json" 2>/dev/null
UP=$(free_port)
"$SG" demo-upstream --listen 127.0.0.1:$UP --worker-threads 1 >/dev/null 2>&1 & PIDS+=($!)
REDIS_P=$(free_port)
redis-server --port $REDIS_P --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 & PIDS+=($!)
wait_port $UP; wait_port $REDIS_P

# Once process $1 listens on port $2: a warm-up, then SECS of traffic with key $3 counted, with
# instrumentation on only meanwhile. Prints the requests answered.
counted() {
  local pid=$1 port=$2 key=$3 out
  for _ in $(seq 600); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  wrk -t1 -c8 -d2s -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/bench" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  out=$(wrk -t1 -c8 -d"${SECS}s" -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/bench")
  callgrind_control -i off "$pid" >/dev/null
  awk '/ requests in /{print $1}' <<<"$out"
}

# One profile: prints "instructions requests" and leaves the annotated output in $WORK/$name.txt.
profile() {
  local name=$1 key=$2 port admin pid total reqs
  shift 2
  port=$(free_port); admin=$(free_port)
  SLOTGATE_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$name.out" \
    "$SG" gateway --config "$WORK/gateway.json" --upstream http://127.0.0.1:$UP \
    --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin --worker-threads 1 "$@" \
    >/dev/null 2>"$WORK/$name.log" & pid=$!; PIDS+=($pid)
  reqs=$(counted "$pid" "$port" "$key")
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  callgrind_annotate --inclusive=yes --threshold=100 "$WORK/$name.out" >"$WORK/$name.txt" 2>/dev/null
  total=$(awk '/PROGRAM TOTALS/{gsub(",", "", $1); print $1}' "$WORK/$name.txt")
  echo "$total $reqs"
}

# Stages, as the inclusive cost of the function that does each (a symbol regex; with inlining a
# function shows on several lines, one per source file, and the largest is the whole of it).
# Stages nest: `forward` holds the upstream exchange, its response parse and the limit headers.
STAGES='
parse:request-head       Http1Transaction>::parse
lookup:key               Gateway>::authenticate$
lookup:sha256-of-key     sha2::sha256::compress256
limiter                  gateway::table::admit$
prepare:upstream-head    Gateway>::prepare$
forward                  Gateway>::forward::
forward:response-parse   gateway::upstream::parse_raw$
forward:limit-headers    gateway::headers::limit_headers$
write:response-head      Http1Transaction>::encode$
'
stage_table() {
  local name=$1 total=$2 reqs=$3
  echo "| stage | instructions/request | share |"
  echo "|---|---:|---:|"
  printf '| all | %.0f | 100%% |\n' "$(bc -l <<<"$total / $reqs")"
  while read -r stage pattern; do
    [ -n "$stage" ] || continue
    # The largest line of the function: its inclusive cost.
    ir=$(awk -v pat="$pattern" '
      { line = $0; sub(/ \[[^]]*\]$/, "", line) }
      $1 ~ /^[0-9,]+$/ && line ~ pat { v = $1; gsub(",", "", v); if (v + 0 > max) max = v + 0 }
      END { print max + 0 }' "$WORK/$name.txt")
    printf '| %s | %.0f | %.1f%% |\n' "$stage" "$(bc -l <<<"$ir / $reqs")" "$(bc -l <<<"100 * $ir / $total")"
  done <<<"$STAGES"
}

# nginx under callgrind: prints "instructions requests".
profile_nginx() {
  local port pid reqs
  port=$(free_port)
  cat >"$WORK/nginx.conf" <<EOF
$(nginx_conf_head nginx "master_process off;")
$(nginx_limit_zones $UP)
$(nginx_limited_server $port)
}
EOF
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/nginx.out" \
    nginx -c "$WORK/nginx.conf" >/dev/null 2>"$WORK/nginx.log" & pid=$!; PIDS+=($pid)
  reqs=$(counted "$pid" "$port" "$KEY")
  # A graceful stop, then a firm one for keep-alive connections it would wait for.
  kill -QUIT "$pid"; sleep 2; kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  callgrind_annotate "$WORK/nginx.out" 2>/dev/null | awk -v r="$reqs" '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1, r }'
}

read -r total reqs < <(profile_nginx)
echo "## nginx: $reqs requests, $(printf %.0f "$(bc -l <<<"$total / $reqs")") instructions a request"

for mode in ${MODES:-memory:$KEY refusal:$ZERO_KEY redis:$KEY}; do
  IFS=: read -r name key <<<"$mode"
  extra=()
  [ "$name" = redis ] && extra=(--state redis://127.0.0.1:$REDIS_P)
  read -r total reqs < <(profile "$name" "$key" "${extra[@]}")
  echo; echo "## $name: $reqs requests, $(printf %.0f "$(bc -l <<<"$total / $reqs")") instructions a request"; echo
  stage_table "$name" "$total" "$reqs"
  echo; echo "Top inclusive functions:"; echo
  awk '/^ *[0-9,]+ / { print; if (++n == 40) exit }' "$WORK/$name.txt"
  if [ -n "${KEEP:-}" ]; then cp "$WORK/$name.out" "$WORK/$name.txt" "$KEEP"/; fi
done
