# A static binary in a small non-root image.
#
#   docker build -t ngc-mirror .
#
# compiles the binary in golang:1.26 and puts it on distroless/static. To
# build where no registry is reachable (an air-gapped host, the e2e tests),
# compile the binary on the host and use the "prebuilt" target with any
# local base image that has CA certificates (BASE):
#
#   CGO_ENABLED=0 go build -trimpath -o bin/mirror ./cmd/mirror
#   docker build --target prebuilt --build-arg BASE=<local image> -t ngc-mirror .
#
# Stages are in this order so that the legacy builder, which builds every
# stage up to the target, needs no Go image for "prebuilt".
ARG BASE=gcr.io/distroless/static-debian12:nonroot

FROM ${BASE} AS base

# What both images share: the configuration, the non-root user (65532, the
# distroless "nonroot"), and the cache directory owned by it, so that a
# fresh named volume mounted there is writable. The base has no shell to
# mkdir it: the (empty) /tmp every base has is copied with that owner.
FROM base AS runtime
COPY configs/mirror.yaml /etc/ngc-mirror/mirror.yaml
COPY --from=base --chown=65532:65532 /tmp/ /data/
USER 65532:65532
ENV MIRROR_DATA_DIR=/data
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["/mirror", "serve", "--config", "/etc/ngc-mirror/mirror.yaml"]

FROM runtime AS prebuilt
COPY bin/mirror /mirror

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/mirror ./cmd/mirror

FROM runtime
COPY --from=build /out/mirror /mirror
