#!/usr/bin/env bash
# Runs every test slotgate has, on a fresh machine: installs what the tests need, then format,
# lint, unit, black-box and doc tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing outside the Rust toolchain is needed yet; later suites (Redis, Helm rendering) install
# their packages here, so a new machine passes the same way an old one does.
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
cargo test --doc --locked
