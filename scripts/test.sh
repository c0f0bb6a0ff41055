#!/usr/bin/env bash
# Runs every test slotgate has, on a fresh machine: installs what the tests need, then format,
# lint, unit, black-box and doc tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The README quickstart test runs curl as a newcomer would; the shared-state tests start their own
# redis-server processes. Installed here when missing, so a new machine passes the same way an old
# one does.
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
# The https webhook test makes its own CA and certificate with openssl.
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The package starts a system-wide server; the tests run their own on free ports.
  (service redis-server stop || true) >/dev/null 2>&1
fi
# The chart tests render charts/slotgate with the real Helm engine (helm-python-sdk: Helm v4 as a
# library, no helm binary) and check every object against the Kubernetes schemas
# (kubernetes-validate). The task tests verify webhook signatures with the Standard Webhooks
# reference library (standardwebhooks), not only with slotgate's own code. All three live in a
# virtual environment under target/.
venv=target/chart-venv
if ! "$venv/bin/python" -c "import helm_python, kubernetes_validate, standardwebhooks" >/dev/null 2>&1; then
  if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv" || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q --disable-pip-version-check helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 standardwebhooks==1.1.0
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
cargo test --doc --locked
