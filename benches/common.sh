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

# An ApiKey `$1` on plan `$2` and its token Secret (token `$3`, then any further `stringData`
# entries in `$4`), each document led by `---`.
key_manifest() {
  cat <<EOF
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiKey
metadata: {name: $1, namespace: default}
spec: {plan: $2}
---
apiVersion: v1
kind: Secret
metadata: {name: $1-token, namespace: default}
stringData: {token: $3${4:+, $4}}
EOF
}

# The benchmarks' manifests in folder $1: plan `bench` (1,000 slots and 1,000,000 req/s, so that
# nothing is refused and the cost of keeping the books is what is measured) with key token $2,
# and plan `zero` (no slots: every answer is a 429) with key token $3.
bench_manifests() {
  mkdir -p "$1"
  {
    cat <<EOF
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
EOF
    key_manifest bench bench "$2"
    key_manifest zero zero "$3"
  } > "$1/bench.yaml"
}

# The head of an nginx conf for one worker in the foreground, its pid and error log named `$1` in
# the scratch folder, up to the opening of its `http` block (access log off, temp files in
# `$WORK/$1-tmp`); $2 more main-context directives (`master_process off;` under valgrind). The
# caller writes the servers and the closing brace.
nginx_conf_head() {
  mkdir -p "$WORK/$1-tmp"
  cat <<EOF
worker_processes 1;
${2:-}
daemon off;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1-tmp;
  proxy_temp_path $WORK/$1-tmp;
EOF
}

# nginx's side of the comparison, in an `http` block: a `limit_conn` and a `limit_req` zone keyed
# by the API key with the bench plan's limits, and the upstream at port $1 with keep-alive.
nginx_limit_zones() {
  cat <<EOF
  limit_conn_zone \$http_x_api_key zone=slots:10m;
  limit_req_zone \$http_x_api_key zone=rate:10m rate=1000000r/s;
  upstream up { server 127.0.0.1:$1; keepalive 256; }
EOF
}

# A server at port $1 that does what slotgate does to a request: the limits of
# `nginx_limit_zones`, the key header stripped, X-Forwarded-For and X-Forwarded-Host set, so that
# the upstream parses the same amount either way. $2 (default `http://up`) is where it proxies to,
# and $3 any further directives of its location (TLS to the upstream, an injected header).
nginx_limited_server() {
  cat <<EOF
  server {
    listen 127.0.0.1:$1;
    location / {
      limit_conn slots 1000;
      limit_req zone=rate burst=1000000 nodelay;
      limit_conn_status 429;
      limit_req_status 429;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-API-Key "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_pass ${2:-http://up};
${3:-}
    }
  }
EOF
}

# A test CA and a leaf for 127.0.0.1 signed by it, in folder $1: ca.pem, leaf.pem, leaf.key.
test_pki() {
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  (
    cd "$1"
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=slotgate bench CA" 2>/dev/null
    openssl req "${ec[@]}" -keyout leaf.key -out leaf.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 1 \
      -extfile leaf.ext 2>/dev/null
  )
}

# An ApiUpstream `$1` at URL $2 serving every path, with the provider credential of Secret
# `provider` and, for https, the CA bundle of ConfigMap `provider-ca` (PEM file $3).
target_manifests() {
  cat <<EOF
---
apiVersion: slotgate.dev/v1alpha1
kind: ApiUpstream
metadata: {name: $1}
spec:
  url: $2
  paths: ["/*"]
  credentialRef: {namespace: default, name: provider, key: api-key}
EOF
  if [ -n "${3:-}" ]; then
    cat <<EOF
  tls:
    caBundleRef: {namespace: default, name: provider-ca, key: ca.crt}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: provider-ca, namespace: default}
data:
  ca.crt: |
$(sed 's/^/    /' "$3")
EOF
  fi
}
