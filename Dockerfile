# Multi-stage build: a static binary in a small non-root image.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/mirror ./cmd/mirror && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/mirror /mirror
COPY configs/mirror.yaml /etc/ngc-mirror/mirror.yaml
# The cache directory, owned by the image's non-root user, so that a fresh
# named volume mounted there is writable.
COPY --from=build --chown=65532:65532 /out/data /data
ENV MIRROR_DATA_DIR=/data
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["/mirror", "serve", "--config", "/etc/ngc-mirror/mirror.yaml"]
