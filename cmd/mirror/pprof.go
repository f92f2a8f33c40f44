//go:build pprof

package main

// Profiling build (go build -tags pprof ./cmd/mirror): serves
// net/http/pprof on MIRROR_PPROF_ADDR (default 127.0.0.1:6060) and records
// block and mutex events, for the profiles of bench/RESULTS.md. Never part
// of a release build.

import (
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime"
)

func init() {
	addr := os.Getenv("MIRROR_PPROF_ADDR")
	if addr == "" {
		addr = "127.0.0.1:6060"
	}
	runtime.SetBlockProfileRate(10000) // one event per 10 µs blocked, on average
	runtime.SetMutexProfileFraction(10)
	go func() { _ = http.ListenAndServe(addr, nil) }()
}
