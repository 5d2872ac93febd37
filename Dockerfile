# syntax=docker/dockerfile:1
# One small image with the `tessera` binary; each Deployment runs `tessera serve <service>`.
# The build stage is the same command CI runs: cargo build --release --locked -p tessera.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tessera \
    && install -D -m 0755 target/release/tessera /out/tessera

# distroless/cc: glibc and libgcc only, no shell, runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tessera /usr/local/bin/tessera
USER 65532:65532
# gRPC, HTTP gateway, Prometheus metrics of gRPC services.
EXPOSE 50051 8080 9464
ENV TESSERA_GRPC_ADDR=0.0.0.0:50051 \
    TESSERA_HTTP_ADDR=0.0.0.0:8080 \
    TESSERA_TELEMETRY__LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/tessera"]
CMD ["--help"]
