#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root):
# skopeo, a Docker daemon, containerd, Prometheus (with promtool),
# docker-compose, redis-server, haproxy and kubectl from Debian; crane, versitygw (an S3 server) and the
# OCI distribution-spec conformance suite (as oci-conformance) from the Go module proxy.
set -euo pipefail
need=()
command -v skopeo >/dev/null || need+=(skopeo)
command -v dockerd >/dev/null || need+=(docker.io)
command -v containerd >/dev/null || need+=(containerd)
command -v prometheus >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v make >/dev/null || need+=(make)
command -v redis-server >/dev/null || need+=(redis-server)
command -v kubectl >/dev/null || need+=(kubectl)
command -v haproxy >/dev/null || need+=(haproxy)  # the load balancer in front of 3 replicas in the e2e cluster tests  # kubectl kustomize renders deploy/kubernetes in go test ./deploy
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v crane >/dev/null; then
  (cd / && GOBIN=/usr/local/bin go install github.com/google/go-containerregistry/cmd/crane@v0.22.1)
fi
# A real S3-compatible server for the S3 cache tests (about 2 minutes to build cold).
if ! command -v versitygw >/dev/null; then
  (cd / && GOBIN=/usr/local/bin go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)
fi
# Helm renders deploy/helm/ngc-mirror in go test ./deploy (the binary, not
# the Go library: that would pull Kubernetes' modules into go.mod).
if ! command -v helm >/dev/null; then
  (cd / && GOBIN=/usr/local/bin go install helm.sh/helm/v4/cmd/helm@v4.3.2)
fi
# The OCI distribution-spec conformance suite (pull, read-only), run by the
# e2e tests against the mirror; `go install` names it conformance.
if ! command -v oci-conformance >/dev/null; then
  d=$(mktemp -d)
  (cd / && GOBIN="$d" go install github.com/opencontainers/distribution-spec/conformance@v0.0.0-20260831232431-97274622c111)
  install -m 0755 "$d/conformance" /usr/local/bin/oci-conformance
  rm -rf "$d"
fi
# The first line of a command's version output. sed reads all of it: with
# `| head -1` the command can die of SIGPIPE after head exits, and pipefail
# turns that into exit 141.
first_line() { "$@" 2>&1 | sed -n 1p; }
skopeo --version
crane version
dockerd --version
containerd --version
first_line prometheus --version
docker-compose --version
first_line versitygw --version || true
redis-server --version
first_line haproxy -v
first_line kubectl version --client
helm version --short
