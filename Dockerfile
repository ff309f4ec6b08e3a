# Multi-stage build of a small, shell-less, non-root image.
#   docker build -t coupa-auth-proxy .
#   docker run -v "$PWD/proxy.toml:/etc/coupa-auth-proxy/proxy.toml:ro" \
#     -e COUPA_CLIENT_SECRET -p 8080:8080 coupa-auth-proxy
# Probes belong to the orchestrator (GET /healthz and /readyz on the admin
# address), so the image has no HEALTHCHECK.

FROM rust:1.95-slim-bookworm AS build
# make: jemalloc (the proxy's allocator) is built from source by its crate.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin coupa-auth-proxy \
    && mkdir -p /man/man1 \
    && target/release/coupa-auth-proxy manpage > /man/man1/coupa-auth-proxy.1

# glibc and CA certificates, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/coupa-auth-proxy /usr/local/bin/coupa-auth-proxy
# The man page, generated from the command line's definition (read it with
# `docker cp` or a debug image; the runtime image has no man).
COPY --from=build /man/man1/coupa-auth-proxy.1 /usr/local/share/man/man1/coupa-auth-proxy.1
ENV COUPA_PROXY_CONFIG=/etc/coupa-auth-proxy/proxy.toml
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/coupa-auth-proxy", "--log-format", "json"]
CMD ["run"]
