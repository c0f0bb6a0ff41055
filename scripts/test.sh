#!/usr/bin/env bash
# Runs every test slotgate has, on a fresh machine: installs what the tests need, then format,
# lint, unit, black-box and doc tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The README quickstart test runs curl as a newcomer would. Later suites (Redis, Helm rendering)
# install their packages here too, so a new machine passes the same way an old one does.
if ! command -v curl >/dev/null; then
  apt-get update -qq && apt-get install -y -qq curl >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
cargo test --doc --locked
