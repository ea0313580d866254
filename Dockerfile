# syntax=docker/dockerfile:1
# parley: multi-stage build. The builder compiles a release binary; the runtime image holds only
# that binary, CA certificates, a non-root user and /data, the volume of the SQLite database.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Build the dependencies first so that source changes reuse this layer.
# The benchmark harness is a workspace member: its manifest (and a stub) keep the workspace whole;
# it is never built here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/Cargo.toml ./bench/Cargo.toml
RUN mkdir -p src migrations bench/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked -p parley --bin parley || true
COPY migrations ./migrations
COPY web ./web
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p parley --bin parley \
    && strip target/release/parley

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin parley \
    && mkdir /data && chown parley:parley /data
COPY --from=builder /src/target/release/parley /usr/local/bin/parley
USER parley:parley
# Listening beyond loopback: require API keys (mount the keys file; `parley keys new` makes keys).
ENV PARLEY_ADDR=0.0.0.0:8080 \
    PARLEY_LOG_FORMAT=json \
    PARLEY_AUTH=api_key \
    PARLEY_API_KEYS_FILE=/etc/parley/keys.toml \
    PARLEY_STORE=sqlite \
    PARLEY_SQLITE_PATH=/data/parley.db
# The SQLite database (and its -wal, -shm and .lock files) lives in a volume: mount one with -v.
VOLUME ["/data"]
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/parley"]
