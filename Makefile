# ngc-mirror: build, run and test. `make test` is what CI runs.
GO ?= go
# The storage and proxy tests run against a real S3 server (versitygw from
# .ci/install.sh); make test requires it rather than skipping.
export MIRROR_TEST_REQUIRE_S3 = 1
# Likewise a real redis-server (Debian's package) for the state store tests.
export MIRROR_TEST_REQUIRE_REDIS = 1

.PHONY: run build test unit fuzz e2e deps bench

run: ## run the mirror with embedded defaults (anonymous nvcr.io, ./data)
	$(GO) run ./cmd/mirror serve

# `mirror version` and the ngc_mirror_build_info metric report these.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell test -z "$$(git status --porcelain 2>/dev/null)" || echo -dirty)
BUILD_TIME ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
BIN ?= bin/mirror

build: ## a static binary in $(BIN) (bin/mirror) with version, revision and build time
	CGO_ENABLED=0 $(GO) build -trimpath \
		-ldflags "-X main.version=$(VERSION) -X main.revision=$(REVISION) -X main.buildTime=$(BUILD_TIME)" \
		-o $(BIN) ./cmd/mirror

test: unit fuzz e2e ## the whole suite (needs the clients from `make deps`)

unit:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e
	$(GO) test -race -count=1 ./...

# A fixed number of inputs, not a duration: a timed -fuzztime can end in a
# spurious "context deadline exceeded" on a loaded machine.
FUZZTIME ?= 100000x
fuzz: ## each fuzz target for FUZZTIME inputs (seed corpora in testdata/fuzz and the f.Add seeds)
	$(GO) test -run '^$$' -fuzz '^FuzzParseChallenges$$' -fuzztime $(FUZZTIME) ./internal/auth
	$(GO) test -run '^$$' -fuzz '^FuzzParseTokenResponse$$' -fuzztime $(FUZZTIME) ./internal/auth
	$(GO) test -run '^$$' -fuzz '^FuzzParseContentRange$$' -fuzztime $(FUZZTIME) ./internal/upstream
	$(GO) test -run '^$$' -fuzz '^FuzzParseRange$$' -fuzztime $(FUZZTIME) ./internal/proxy
	$(GO) test -run '^$$' -fuzz '^FuzzParseRoute$$' -fuzztime $(FUZZTIME) ./internal/proxy
	$(GO) test -run '^$$' -fuzz '^FuzzReferences$$' -fuzztime $(FUZZTIME) ./internal/manifest

e2e: ## real skopeo, crane and a Docker daemon against the mirror binary
	$(GO) test -tags e2e -count=1 -v ./test/e2e

deps: ## install the real clients the end-to-end tests drive (root, Debian)
	bash .ci/install.sh

bench: ## issue-3 benchmarks against a static file server and CNCF Distribution (minutes; not part of test)
	bash bench/run.sh
