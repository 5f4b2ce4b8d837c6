# syntax=docker/dockerfile:1
# The `skein` binary in a small image: every worker, the ingress and the
# operator commands (compose.yaml runs it).
#
#   docker build -t skein .
#   docker run --rm skein --help

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p skein-cli \
    && cp target/release/skein /usr/local/bin/skein

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates for TLS to NATS or PostgreSQL; curl for health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid. Its home is the working directory, where `skein
# worker` keeps `data/` (SQLite, identity's key) unless told otherwise; the
# key directory exists here so that a volume mounted on it starts out owned
# by this user.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/skein skein \
    && mkdir -p /var/lib/skein/data /var/lib/skein/keys \
    && chown -R skein:skein /var/lib/skein
COPY --from=build /usr/local/bin/skein /usr/local/bin/skein
USER skein
WORKDIR /var/lib/skein
ENTRYPOINT ["skein"]
CMD ["--help"]
