# Build: docker build -t outboxd .
# Run:   docker run --rm -e ORDERS_DATABASE_URL=... -e OUTBOXD_AMQP_URL=... -p 9187:9187 outboxd
#        (or mount your own config at /etc/outboxd/outboxd.toml)

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The whole tree (minus .dockerignore): the workspace lists bench/ as a
# member, and cargo reads every member's manifest and finds its target
# before it builds anything, so bench/ must be here even though only the
# relay is built (-p outboxd: the bench itself is not compiled).
COPY . .
RUN cargo build --release --locked -p outboxd --bin outboxd

# distroless "cc": glibc and libgcc, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/outboxd /usr/local/bin/outboxd
COPY config/outboxd.toml /etc/outboxd/outboxd.toml
# In a container the probes and the scraper come from outside the process.
ENV OUTBOXD_METRICS_LISTEN=0.0.0.0:9187
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/outboxd"]
CMD ["run", "-c", "/etc/outboxd/outboxd.toml"]
