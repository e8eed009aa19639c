# Build: docker build -t outboxd .
# Run:   docker run --rm -e ORDERS_DATABASE_URL=... -e OUTBOXD_AMQP_URL=... -p 9187:9187 outboxd
#        (or mount your own config at /etc/outboxd/outboxd.toml)

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own that only a change of a
# manifest or of Cargo.lock rebuilds: the workspace's manifests (bench/ is
# a member, and cargo reads every member's manifest and finds its target
# before it builds anything, though only the relay is built) with stub
# sources, so this builds every crate but outboxd.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p outboxd --bin outboxd \
 && rm -rf src bench/src
# Then the whole tree (minus .dockerignore). Its files keep their times
# from the build context, which can be older than the stub build: cargo
# would find the stub "fresh" and ship it. Touching the crate roots makes
# it rebuild outboxd, and only outboxd.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked -p outboxd --bin outboxd

# distroless "cc": glibc and libgcc, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/outboxd /usr/local/bin/outboxd
COPY config/outboxd.toml /etc/outboxd/outboxd.toml
# In a container the probes and the scraper come from outside the process.
ENV OUTBOXD_METRICS_LISTEN=0.0.0.0:9187
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 9187
# No shell or curl in this image: the binary asks its own /healthz
# (`outboxd health`, exit 0 on 200). It asks 127.0.0.1:9187; if you move
# the metrics port, set OUTBOXD_HEALTH_URL=http://127.0.0.1:PORT too.
# /healthz ignores the broker and the databases (restarting fixes
# neither), so "unhealthy" means a stuck relay loop or a dead process.
HEALTHCHECK --interval=10s --timeout=6s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/outboxd", "health"]
ENTRYPOINT ["/usr/local/bin/outboxd"]
CMD ["run", "-c", "/etc/outboxd/outboxd.toml"]
