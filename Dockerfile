# syntax=docker/dockerfile:1
#
# conveyour-cdc: a small, non-root image with the binary as its entrypoint.
#
#   docker build -t conveyour-cdc:0.1.0 .
#   docker run --rm -v $PWD/config.yaml:/etc/conveyour-cdc/config.yaml:ro \
#     -e PGPASSWORD -e CONVEYOUR_APPKEY -e CONVEYOUR_TOKEN -p 9187:9187 conveyour-cdc:0.1.0
#
# TLS (Postgres and ConveYour) is rustls on ring, so the runtime needs no
# OpenSSL: distroless "cc" (glibc, libgcc) is enough.

FROM rust:1-bookworm AS build
WORKDIR /src
# Everything Cargo.toml names as a target (lib, bin, tests, example, bench)
# must be present for cargo to read the manifest.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY benches ./benches
# The registry and target caches survive between builds (BuildKit); the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin conveyour-cdc \
 && install -D -m 0755 target/release/conveyour-cdc /out/conveyour-cdc

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/conveyour-cdc /usr/local/bin/conveyour-cdc
# JSON log lines for log collectors; override with --log-format text.
ENV CONVEYOUR_CDC_LOG_FORMAT=json
# /metrics, /healthz, /readyz (metrics.listen in the config).
EXPOSE 9187
# distroless' nonroot user; the Helm chart runs as the same uid.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/conveyour-cdc"]
CMD ["run", "--config", "/etc/conveyour-cdc/config.yaml"]
