#!/usr/bin/env bash
# Runs ngc-mirror's benchmark suite (issue 3): builds the mirror and the
# harness, installs the peer (CNCF Distribution v3.1.2) into a temporary
# directory, runs every case side by side and prints a markdown table.
# Extra arguments go to the harness (see bench/README.md), for example:
#
#   bench/run.sh -out /tmp/results.md
#   bench/run.sh -cases 1,4 -blob-size 256MiB
#   bench/run.sh -cases 6        # only the S3 cache-hit case (needs versitygw)
#   bench/run.sh -cases 8        # 1 vs 3 replicas behind HAProxy (needs haproxy, redis-server, versitygw)
#
# PEER_BIN=/path/to/registry skips the `go install` of the peer (so does a
# -cases list without cases 1-5: case 6 does not use it). VERSITYGW_BIN
# names the versitygw binary for case 6 (default: versitygw on PATH). Everything
# (binaries, data dirs, logs, the cached blobs) lives under one temporary
# directory that is removed at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_VERSION=v3.1.2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ngc-mirror-bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

echo "bench: building the mirror (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)) and the harness in $tmp" >&2
CGO_ENABLED=0 go build -o "$tmp/mirror" ./cmd/mirror
go build -o "$tmp/harness" ./bench/harness

# Does the run need the peer? Only cases 1-5 use it.
cases=1,2,3,4,5,6
prev=
for a in "$@"; do
	case "$prev" in -cases | --cases) cases=$a ;; esac
	case "$a" in -cases=* | --cases=*) cases=${a#*=} ;; esac
	prev=$a
done
need_peer=false
case ",${cases// /}," in *,[1-5],*) need_peer=true ;; esac

extra_args=()
if [ -n "${VERSITYGW_BIN:-}" ]; then
	extra_args+=(-versitygw "$VERSITYGW_BIN")
fi

peer_args=()
if ! $need_peer; then
	echo "bench: cases $cases do not use the peer; not installing it" >&2
elif [ -n "${PEER_BIN:-}" ]; then
	peer_args=(-peer "$PEER_BIN")
else
	echo "bench: installing the peer, github.com/distribution/distribution/v3/cmd/registry@$PEER_VERSION" >&2
	if GOBIN="$tmp" go install "github.com/distribution/distribution/v3/cmd/registry@$PEER_VERSION"; then
		peer_args=(-peer "$tmp/registry")
	else
		echo "bench: could not install the peer; its columns will read n/a" >&2
	fi
fi

"$tmp/harness" -mirror "$tmp/mirror" "${peer_args[@]}" "${extra_args[@]}" -work "$tmp/work" "$@"
