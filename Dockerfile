# syntax=docker/dockerfile:1.7
#
# One image per binary, all from this file:
#
#   docker build --build-arg BIN=auth-svc -t sec-platform/auth-svc:0.1.0 .
#
# BIN is one of: auth-svc token-svc session-svc audit-svc crypto-svc gdpr-svc assess-svc
# (one service each), secd (every service in one process) or secctl (the operator CLI).
# The binary is /usr/local/bin/$BIN; the Kubernetes manifests name it in `command`.
#
# Both base images are pinned by digest. The digests below are PLACEHOLDERS (no registry
# is reachable where this file was written): fill them in as deploy/README.md
# ("Container images") says before the first build, and update them on purpose.

FROM docker.io/library/rust:1.94-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000 AS build
ARG BIN=secd
WORKDIR /src
# aws-lc-sys (the one crypto stack, via rustls and aws-lc-rs) compiles C: cmake and a C
# toolchain. protoc is vendored (protoc-bin-vendored), nothing to install for it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake gcc g++ make pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# --locked: exactly Cargo.lock's versions, or fail. The caches keep the registry and
# build output between builds of the nine images, so only the first compiles everything.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    case "$BIN" in \
      auth-svc|token-svc|session-svc|audit-svc|crypto-svc|gdpr-svc|assess-svc|secd|secctl) ;; \
      *) echo "BIN must name one of the platform's binaries, not '$BIN'" >&2; exit 2 ;; \
    esac \
 && cargo build --release --locked -p "$BIN" --bin "$BIN" \
 && install -D -m 0755 "target/release/$BIN" "/out/$BIN"

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:0000000000000000000000000000000000000000000000000000000000000000
ARG BIN=secd
LABEL org.opencontainers.image.title="${BIN}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build --chown=0:0 /out/${BIN} /usr/local/bin/${BIN}
# distroless "nonroot": uid/gid 65532, no shell, no package manager.
USER 65532:65532
# The default data_dir (.secdata) lands in the nonroot home; Kubernetes sets data_dir to
# an emptyDir, and the root filesystem stays read-only there.
WORKDIR /home/nonroot
# Kubernetes probes the admin port (/healthz, /readyz); the image has no shell or curl
# for a Docker HEALTHCHECK of its own.
HEALTHCHECK NONE
EXPOSE 8080 50051-50057 9101-9107
