# syntax=docker/dockerfile:1.7
# One image for every role: `orders-center` (api, relay, migrate) and
# `onec-mock`. Cache mounts keep the cargo registry and target directory
# between builds, so only changed crates recompile.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# build: cargo build --release --locked --bin orders-center --bin onec-mock
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin orders-center --bin onec-mock \
    && scripts/image-files /out

# Distroless: glibc and CA certificates, no shell, no package manager. What
# goes in, and USER, ENTRYPOINT, CMD and EXPOSE, follow image/contents.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /
USER 65532:65532
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/orders-center"]
CMD ["api"]
