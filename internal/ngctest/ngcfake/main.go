// Command ngcfake runs the NGC-like test upstream on loopback, for trying
// the mirror without nvcr.io:
//
//	go run ./internal/ngctest/ngcfake &
//	MIRROR_UPSTREAM=http://127.0.0.1:PORT go run ./cmd/mirror serve
//
// It serves the fixture images (nvidia/pytorch:17.12, nvidia/cuda,
// nvidia/k8s/dcgm-exporter and the private myorg/team/private-image, whose
// API key it prints) until interrupted. -captive-portal makes it answer
// every request with an HTML page instead, as a captive portal does.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

func main() {
	layer := flag.Int64("layer-size", 1<<20, "uncompressed bytes per fixture layer")
	portal := flag.Bool("captive-portal", false, "answer every request with 200 and an HTML page, as a captive portal does")
	flag.Parse()
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	if *portal {
		up.SetFault(ngctest.CaptivePortal)
	}
	if _, err := up.Populate(*layer); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("NGC-like upstream: %s (CDN %s)\n", up.URL(), up.CDN.URL)
	fmt.Printf("images: %s:%s %s:%s %s:%s; private %s:%s (API key %s)\n",
		ngctest.PytorchRepo, ngctest.PytorchTag, ngctest.CUDARepo, ngctest.CUDATag,
		ngctest.DCGMRepo, ngctest.DCGMTag, ngctest.PrivateRepo, ngctest.PrivateTag, ngctest.APIKey)
	fmt.Printf("run the mirror with: MIRROR_UPSTREAM=%s go run ./cmd/mirror serve\n", up.URL())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
}
