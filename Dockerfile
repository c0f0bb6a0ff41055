# syntax=docker/dockerfile:1
# The one slotgate binary (controller, gateway, demo upstream) on a distroless static base:
# no shell, no package manager, non-root. Build: docker build -t ghcr.io/slotgate/slotgate:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so that a source change rebuilds only slotgate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in compile limiter bare_proxy; do echo 'fn main() {}' > benches/$b.rs; done \
    && cargo build --profile dist --locked --target x86_64-unknown-linux-musl || true
COPY src src
COPY benches benches
RUN touch src/main.rs src/lib.rs \
    && cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin slotgate \
    && strip target/x86_64-unknown-linux-musl/dist/slotgate

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/dist/slotgate /usr/local/bin/slotgate
# 65532: distroless "nonroot"; the chart's securityContext runs as this user.
USER 65532:65532
EXPOSE 8080 9090 9091
ENTRYPOINT ["/usr/local/bin/slotgate"]
CMD ["gateway", "--help"]
