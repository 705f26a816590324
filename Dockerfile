# syntax=docker/dockerfile:1
#
# deltasync-producer and deltasync-consumer in one slim runtime image.
#
#   docker build -t deltasync:local .
#   docker run --rm deltasync:local deltasync-producer --help
#
# Stage 1 builds both binaries with BuildKit cache mounts: the cargo registry and the target
# directory survive between builds, so a source change recompiles our crates only, not the
# ~300 dependencies (copying manifests with dummy sources would need a stub for every test,
# bench and example target the workspace declares). `--locked` builds exactly Cargo.lock.
# Stage 2 is Debian slim with ca-certificates (tls:// NATS URLs), curl (compose healthchecks
# on /healthz) and a non-root user; /data holds consumer data directories.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p deltasync-producer -p deltasync-consumer \
    && install -D -m 0755 -t /out \
        target/release/deltasync-producer target/release/deltasync-consumer

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so that volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 deltasync \
    && useradd --system --uid 10001 --gid deltasync --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin deltasync \
    && install -d -o deltasync -g deltasync -m 0750 /data
COPY --from=builder /out/ /usr/local/bin/
USER deltasync:deltasync
WORKDIR /data
# A new named volume mounted here starts with this directory's owner (deltasync), so the
# consumers can create their data directories in it.
VOLUME ["/data"]
EXPOSE 8080
CMD ["deltasync-producer", "--help"]
