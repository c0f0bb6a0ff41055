#!/usr/bin/env bash
# Benchmark of the async task API through `slotgate up` (dist build, durable store on disk).
# Run by hand, not in CI:  bash benches/tasks.sh [SUBMIT_N] [QUEUED_N] [RUN_N]
#
#   submit    SUBMIT_N tasks from 32 connections onto a key with 0 slots (nothing runs, so this
#             is the cost of accepting: parse, check, group-committed write, 202). Tasks/s.
#   queued    QUEUED_N tasks queued on that key: RSS of the process before and after.
#   run       RUN_N tasks on a 25-slot key against the demo upstream holding each for 100 ms:
#             slot utilisation (the running-tasks gauge sampled every 100 ms over the middle of
#             the run, divided by 25), completion rate against the ideal 25 / 100 ms, and the
#             webhook's delay after the task finished (webhook attempt time - finishedAt, from
#             GET /v1/tasks), p50 and p99; `slotgate load --tasks` checks every signature.
#   restart   kill -9 with the QUEUED_N backlog on disk, start again on the same store: time to
#             listening, peak RSS (VmHWM) while reading the backlog back, tasks resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBMIT_N=${1:-50000}
QUEUED_N=${2:-1000000}
RUN_N=${3:-5000}
# SG=path/to/slotgate compares another build (an A/B of two commits) without rebuilding.
if [[ -z "${SG:-}" ]]; then
  cargo build --profile dist --locked --bin slotgate -q
  SG=$PWD/target/dist/slotgate
fi
source benches/common.sh

SECRET=whsec_c2xvdGdhdGUtYmVuY2gtd2ViaG9vay1zZWNyZXQ=
mkdir -p "$WORK/manifests"
cat > "$WORK/manifests/bench.yaml" <<EOF
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: parked}
spec:
  concurrency: {maxConcurrentRequests: 0, paths: ["/*"]}
  tasks: {maxQueued: 5000000}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiPlan
metadata: {name: run}
spec:
  concurrency: {maxConcurrentRequests: 25, paths: ["/*"]}
  tasks: {maxQueued: 5000000}
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiTaskType
metadata: {name: work}
spec:
  taskType: WORK
  request: {path: /v1/work}
EOF
for k in parked run; do
  key_manifest "$k" "$k" "tok-bench-$k" "webhook-secret: $SECRET" >> "$WORK/manifests/bench.yaml"
done

P=$(free_port); A=$(free_port)
"$SG" up "$WORK/manifests" --listen 127.0.0.1:$P --admin-listen 127.0.0.1:$A \
  --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
UP_PID=$!; PIDS+=($UP_PID)
wait_port "$P"
rss() { awk '/VmRSS/ {print $2}' /proc/$UP_PID/status; }

echo "== submit: $SUBMIT_N tasks, 32 connections, key with 0 slots"
"$SG" load "http://127.0.0.1:$P" --key tok-bench-parked --tasks "$SUBMIT_N" -c 32 \
  --task-type WORK --wait 0s --json 2>/dev/null >"$WORK/submit.json" || true
python3 - "$WORK/submit.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"accepted {s['accepted']} of {s['submitted']} in {s['submit_s']:.2f} s: {s['accepted_per_second']:.0f} tasks/s durable; refused {s['refused']} errors {s['errors']}")
EOF

echo "== queued: fill to $QUEUED_N queued tasks"
before=$(rss)
"$SG" load "http://127.0.0.1:$P" --key tok-bench-parked --tasks "$((QUEUED_N - SUBMIT_N))" -c 32 \
  --task-type WORK --wait 0s --json 2>/dev/null >"$WORK/fill.json" || true
sleep 2
after=$(rss)
queued=$(curl -s "http://127.0.0.1:$A/metrics" | awk '/^slotgate_tasks_queued\{plan="parked"\}/ {print $2}')
echo "queued $queued: RSS ${before} kB after $SUBMIT_N, ${after} kB now; store $(du -sh "$WORK/data" | cut -f1) on disk"

echo "== run: $RUN_N tasks, 25 slots, upstream holds each 100 ms (ideal 250 tasks/s)"
( for _ in $(seq 600); do
    curl -s "http://127.0.0.1:$A/metrics" | awk '/^slotgate_tasks_running\{plan="run"\}/ {print $2}'
    sleep 0.1
  done ) >"$WORK/running.txt" &
SAMPLER=$!; PIDS+=($SAMPLER)
"$SG" load "http://127.0.0.1:$P" --key tok-bench-run --tasks "$RUN_N" -c 8 --task-type WORK \
  --payload '{"prompt": "bench", "delay_ms": 100}' --webhook-secret "$SECRET" --wait 300s --json \
  2>/dev/null >"$WORK/run.json"
kill $SAMPLER 2>/dev/null || true
python3 - "$WORK/run.json" "$WORK/running.txt" "http://127.0.0.1:$P" <<'EOF'
import json, sys, urllib.request, datetime
s = json.load(open(sys.argv[1]))
samples = [float(x) for x in open(sys.argv[2]) if x.strip()]
busy = [x for x in samples if x > 0]
mid = busy[len(busy) // 10 : len(busy) * 9 // 10] or busy
util = sum(mid) / len(mid) / 25 * 100 if mid else 0
rate = s["delivered"] / s["duration_s"]
print(f"delivered {s['delivered']} lost {s['lost']} duplicates {s['duplicates']} bad signatures {s['bad_signatures']} in {s['duration_s']:.1f} s: {rate:.0f} tasks/s ({rate / 250 * 100:.1f}% of ideal)")
print(f"slot utilisation (running gauge, middle 80% of the run): {util:.1f}%")
def ms(t): return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1e3
lat, cursor = [], None
while True:
    url = sys.argv[3] + "/v1/tasks?status=completed&limit=1000" + (f"&cursor={cursor}" if cursor else "")
    page = json.load(urllib.request.urlopen(urllib.request.Request(url, headers={"x-api-key": "tok-bench-run"})))
    for t in page["tasks"]:
        a = t.get("webhook", {}).get("attempts", [])
        if a and "finishedAt" in t:
            lat.append(ms(a[0]["at"]) - ms(t["finishedAt"]))
    cursor = page.get("nextCursor")
    if not cursor: break
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]
print(f"webhook after finish ({len(lat)} tasks): p50 {p(0.5):.0f} ms p99 {p(0.99):.0f} ms max {lat[-1]:.0f} ms (ms resolution)")
print(f"202 to webhook: p50 {s['completion_ms']['p50']:.0f} ms p99 {s['completion_ms']['p99']:.0f} ms")
EOF

echo "== restart: kill -9 with $QUEUED_N queued, start again on the same store"
kill -9 $UP_PID; wait $UP_PID 2>/dev/null || true
t0=$(date +%s.%N)
"$SG" up "$WORK/manifests" --listen 127.0.0.1:$P --admin-listen 127.0.0.1:$A \
  --data-dir "$WORK/data" >"$WORK/up2.log" 2>&1 &
UP_PID=$!; PIDS+=($UP_PID)
# Reading a million tasks back takes seconds: wait up to a minute, not wait_port's five.
for _ in $(seq 1200); do (echo >/dev/tcp/127.0.0.1/"$P") 2>/dev/null && break; sleep 0.05; done
t1=$(date +%s.%N)
sleep 1
echo "listening again after $(python3 -c "print(f'{$t1 - $t0:.2f}')") s; peak RSS $(awk '/VmHWM/ {print $2}' /proc/$UP_PID/status) kB, RSS now $(rss) kB"
grep -o '[0-9]* unfinished tasks resumed' "$WORK/up2.log"
