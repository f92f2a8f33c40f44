// Command ngcfake runs the test upstreams on loopback, for trying the
// mirror without nvcr.io (or Docker Hub):
//
//	go run ./internal/ngctest/ngcfake &
//	MIRROR_UPSTREAM=http://127.0.0.1:PORT go run ./cmd/mirror serve
//
// It serves the fixture images (nvidia/pytorch:17.12, nvidia/cuda,
// nvidia/k8s/dcgm-exporter and the private myorg/team/private-image, whose
// API key it prints) until interrupted. -captive-portal makes it answer
// every request with an HTML page instead, as a captive portal does.
//
// -dockerhub also starts the Docker-Hub-like upstream (its own token realm,
// library/ubuntu:24.04, library/busybox, ngctestorg/tool and the private
// ngctest/private, an anonymous pull limit with -pull-limit), and -plain the
// plain anonymous registry (pause:3.10, coredns/coredns); it prints the
// upstreams: section of a mirror config that serves all of them.
//
// Content (layers, hence every digest) is new on each start unless -seed
// N is given: the same N and -layer-size make the same images, so that a
// mirror's cache from an earlier run still matches the fake.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

func main() {
	layer := flag.Int64("layer-size", 1<<20, "uncompressed bytes per fixture layer")
	portal := flag.Bool("captive-portal", false, "answer every request with 200 and an HTML page, as a captive portal does")
	hub := flag.Bool("dockerhub", false, "also run the Docker-Hub-like upstream")
	limit := flag.Int("pull-limit", 0, "anonymous manifest GETs the Docker-Hub-like upstream answers before 429 (0: no limit)")
	plain := flag.Bool("plain", false, "also run the plain anonymous registry")
	seed := flag.Int64("seed", 0, "make the same images (digests) on every start with the same seed and -layer-size (0: new random content each start)")
	flag.Parse()
	up := ngctest.New(ngctest.Options{})
	defer up.Close()
	if *seed != 0 {
		up.SeedContent(*seed)
	}
	if *portal {
		up.SetFault(ngctest.CaptivePortal)
	}
	if _, err := up.Populate(*layer); err != nil {
		fail(err)
	}
	ngcBanner(os.Stdout, up.URL(), up.CDN.URL, *portal)
	config := ""
	if *hub {
		d := ngctest.NewDockerHub(ngctest.DockerHubOptions{AnonymousPullLimit: *limit})
		defer d.Close()
		if *seed != 0 {
			d.SeedContent(*seed + 1) // content of its own, the same each start
		}
		if _, err := d.Populate(*layer); err != nil {
			fail(err)
		}
		fmt.Printf("Docker-Hub-like upstream: %s (realm %s, CDN %s)\n", d.URL(), d.Realm(), d.CDN.URL)
		fmt.Printf("images: %s:%s %s:%s %s:%s; private %s:%s (user %s, password %s)\n",
			ngctest.HubUbuntuRepo, ngctest.HubUbuntuTag, ngctest.HubBusyboxRepo, ngctest.HubBusyboxTag,
			ngctest.HubToolRepo, ngctest.HubToolTag, ngctest.HubPrivateRepo, ngctest.HubPrivateTag,
			ngctest.DockerHubUser, ngctest.DockerHubPassword)
		config += fmt.Sprintf("  docker.io:\n    url: %s\n", d.URL())
	}
	if *plain {
		p := ngctest.NewPlain(ngctest.PlainOptions{})
		defer p.Close()
		if *seed != 0 {
			p.SeedContent(*seed + 2)
		}
		if _, err := p.Populate(*layer); err != nil {
			fail(err)
		}
		fmt.Printf("plain registry: %s\n", p.URL())
		fmt.Printf("images: %s:%s %s:%s\n", ngctest.PlainPauseRepo, ngctest.PlainPauseTag, ngctest.PlainCoreDNSRepo, ngctest.PlainCoreDNSTag)
		config += fmt.Sprintf("  registry.k8s.io:\n    url: %s\n", p.URL())
	}
	fmt.Printf("run the mirror with: MIRROR_UPSTREAM=%s go run ./cmd/mirror serve\n", up.URL())
	if config != "" {
		fmt.Printf("and in its config file:\nupstreams:\n%s", config)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
}

// ngcBanner prints what the NGC-like upstream at url serves: its images
// and private API key, or, as a captive portal, that it serves none.
func ngcBanner(w io.Writer, url, cdn string, portal bool) {
	if portal {
		fmt.Fprintf(w, "captive portal: %s answers every request with 200 and an HTML page (no images, no API key)\n", url)
		return
	}
	fmt.Fprintf(w, "NGC-like upstream: %s (CDN %s)\n", url, cdn)
	fmt.Fprintf(w, "images: %s:%s %s:%s %s:%s; private %s:%s (API key %s)\n",
		ngctest.PytorchRepo, ngctest.PytorchTag, ngctest.CUDARepo, ngctest.CUDATag,
		ngctest.DCGMRepo, ngctest.DCGMTag, ngctest.PrivateRepo, ngctest.PrivateTag, ngctest.APIKey)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
