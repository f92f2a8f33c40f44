// Command mirror runs ngc-mirror, a pull-through cache for nvcr.io.
//
//	mirror serve [--config FILE]
//
// It wires the configuration, storage, upstream client, fill group and HTTP
// handler together; the behaviour lives in internal/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/health"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/proxy"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// version and revision are set at link time:
// go build -ldflags "-X main.version=v1.2.3 -X main.revision=$(git rev-parse HEAD)".
var (
	version  = "dev"
	revision = "unknown"
)

const usage = `usage: mirror serve [--config FILE]
       mirror healthcheck     (GET /healthz on MIRROR_ADDR; for container health checks)

Environment (overrides the file): MIRROR_ADDR, MIRROR_UPSTREAM, NGC_API_KEY,
MIRROR_UPSTREAM_USERNAME, MIRROR_DATA_DIR, MIRROR_LOG_LEVEL.
`

func main() {
	if len(os.Args) >= 2 && os.Args[1] == "healthcheck" {
		os.Exit(healthcheck())
	}
	if len(os.Args) < 2 || os.Args[1] != "serve" {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file (see configs/mirror.yaml)")
	_ = fs.Parse(os.Args[2:])

	cfg, err := config.Load(*cfgPath, os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg); err != nil {
		slog.Error("mirror stopped", "err", err)
		os.Exit(1)
	}
}

func serve(ctx context.Context, cfg config.Config) error {
	level, _ := cfg.Level()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	dataDir, err := filepath.Abs(cfg.Storage.DataDir)
	if err != nil {
		return err
	}
	spoolDir := cfg.Cache.SpoolDir
	if spoolDir == "" {
		spoolDir = filepath.Join(dataDir, "_spool")
	}
	if err := os.MkdirAll(spoolDir, 0o750); err != nil {
		return fmt.Errorf("creating spool directory: %w", err)
	}
	store := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dataDir, MaxThreads: 100}))
	// Crash safety: uploads and spools of fills that a crash interrupted.
	// The filesystem cache belongs to this process alone, so all of them go.
	if err := store.PurgeUploads(ctx); err != nil {
		return fmt.Errorf("removing interrupted uploads: %w", err)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(spoolDir, "fill-*")); len(leftovers) > 0 {
		for _, p := range leftovers {
			_ = os.Remove(p)
		}
		log.Info("removed spool files of interrupted fills", "count", len(leftovers))
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := metrics.New(reg)
	metrics.BuildInfo(reg, version, revision, runtime.Version())
	metrics.StorageUsage(reg, store.Usage)
	metrics.FilesystemUsage(reg, dataDir)
	go func() {
		if err := store.Scan(ctx); err != nil {
			log.Warn("scanning the cache for its size failed", "err", err)
		}
	}()

	origin := cfg.UpstreamURL()
	creds := auth.Credentials{Username: cfg.Upstream.Username, Secret: cfg.Upstream.APIKey}
	rt := auth.NewTransport(http.DefaultTransport, origin, creds, log.With("component", "auth"))
	rt.OnTokenExchange = m.TokenExchange
	up := upstream.New(origin, rt)
	up.OnBackoffRefusal = m.BackoffRefusal
	up.OnRequest = func(kind string, status int, d time.Duration) { m.UpstreamRequest(kind, status, d.Seconds()) }
	up.OnBytes = m.UpstreamReceived

	fills := fill.NewGroup(store, fill.Options{
		SpoolDir:           spoolDir,
		IdleTimeout:        time.Duration(cfg.Upstream.BlobIdleTimeout),
		StopWithoutClients: cfg.Cache.StopFillsWithoutClients,
		Log:                log.With("component", "fill"),
		Metrics:            m,
	})
	h := proxy.New(up, store, fills, proxy.Options{
		TagFreshness:    time.Duration(cfg.Cache.TagFreshness),
		ManifestTimeout: time.Duration(cfg.Upstream.Timeout),
		NSAliases:       cfg.Upstream.NSAliases,
		Log:             log.With("component", "proxy"),
		Metrics:         m,
	})
	hc := &health.Checker{StorageProbe: store.Probe, UpstreamProbe: up.Ping}

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", hc.Healthz)
	mux.HandleFunc("/readyz", hc.Readyz)
	mux.Handle("/", h)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("ngc-mirror listening", "addr", ln.Addr().String(), "upstream", origin.String(),
		"credentials", creds, "data_dir", dataDir)

	go func() {
		pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		if err := up.Ping(pctx); err != nil {
			log.Warn("upstream not reachable yet; cached content is still served", "err", err)
		}
	}()

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// healthcheck asks the local mirror's /healthz (at MIRROR_ADDR, default
// :5000) and returns the exit code: 0 when healthy. Distroless images have
// no curl, so container health checks run this.
func healthcheck() int {
	addr := os.Getenv("MIRROR_ADDR")
	if addr == "" {
		addr = ":5000"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck: MIRROR_ADDR:", err)
		return 2
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/healthz")
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, "healthcheck: status", resp.StatusCode)
		return 1
	}
	return 0
}
