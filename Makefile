# ngc-mirror: build, run and test. `make test` is what CI runs.
GO ?= go

.PHONY: run build test unit e2e deps

run: ## run the mirror with embedded defaults (anonymous nvcr.io, ./data)
	$(GO) run ./cmd/mirror serve

build:
	CGO_ENABLED=0 $(GO) build -o bin/mirror ./cmd/mirror

test: unit e2e ## the whole suite (needs the clients from `make deps`)

unit:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e
	$(GO) test -race -count=1 ./...

e2e: ## real skopeo, crane and a Docker daemon against the mirror binary
	$(GO) test -tags e2e -count=1 -v ./test/e2e

deps: ## install the real clients the end-to-end tests drive (root, Debian)
	bash .ci/install.sh
