# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship only the binary on a distroless base that
# runs as a non-root user. TLS roots are compiled in, so the image needs no CA bundle.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# awc, patched (see vendor/awc/README.switchyard.md).
COPY vendor vendor
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY migrations migrations
COPY config config
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip target/release/switchyard \
    && mkdir -p /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
# A writable place for the embedded SQLite file when no PostgreSQL is configured.
COPY --from=build --chown=65532:65532 /data /data
WORKDIR /data
ENV SWITCHYARD_LISTEN=0.0.0.0:8080 \
    SWITCHYARD_DATABASE_URL=sqlite:///data/switchyard.db \
    SWITCHYARD_LOG__FORMAT=json
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["serve"]
