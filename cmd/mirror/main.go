// Command mirror runs ngc-mirror, a pull-through cache for nvcr.io.
//
//	mirror serve [--config FILE]
//
// It wires the configuration, storage, upstream client, fill group and HTTP
// handler together; the behaviour lives in internal/.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/admin"
	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/clientip"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/health"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/proxy"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/tlsreload"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

const usage = `usage: mirror serve [--config FILE]
       mirror version
       mirror healthcheck [--config FILE]   (GET /healthz of the local mirror)
       mirror fsck [--config FILE] [--repair report|quarantine|delete]
       mirror gc [--config FILE] [--dry-run] [--grace 1h]
       mirror prefetch IMAGE [--platform os/arch]... [--detach]   (on the running mirror)
       mirror tags REPOSITORY [--monthly] [--refresh]           (tracked tags, what is cached)
       mirror jobs [--state STATE] | jobs --follow ID | jobs cancel ID   (prefetch jobs)
       mirror htpasswd USER < password   (a line for access.htpasswd_file)
       mirror help

Every command reads the mirror's configuration from --config FILE, else
$MIRROR_CONFIG, else /etc/ngc-mirror/mirror.yaml when it exists, and then
the environment, which overrides the file: MIRROR_ADDR, MIRROR_UPSTREAM,
NGC_API_KEY, MIRROR_UPSTREAM_USERNAME, MIRROR_NS_ALIASES, MIRROR_TRUSTED_PROXIES,
MIRROR_UPSTREAMS_<NAME>_PASSWORD, MIRROR_DATA_DIR,
MIRROR_LOG_LEVEL, MIRROR_ACCESS_LOG, MIRROR_ACCESS_MODE, MIRROR_HTPASSWD_FILE,
MIRROR_TLS_CERT_FILE, MIRROR_TLS_KEY_FILE, MIRROR_STORAGE_DRIVER, MIRROR_S3_*,
MIRROR_CACHE_MAX_SIZE, MIRROR_CACHE_MIN_FREE, MIRROR_REDIS_URL,
MIRROR_ADMIN_TOKEN, MIRROR_CLUSTER_ADVERTISE, MIRROR_CLUSTER_LISTEN,
MIRROR_CLUSTER_SECRET. See configs/mirror.yaml. "mirror COMMAND -h" lists a
command's flags.
`

func main() {
	if len(os.Args) >= 2 {
		switch os.Args[1] {
		case "healthcheck":
			os.Exit(healthcheck(os.Args[2:]))
		case "fsck":
			os.Exit(fsck(os.Args[2:]))
		case "gc":
			os.Exit(gc(os.Args[2:]))
		case "prefetch":
			os.Exit(prefetchCmd(os.Args[2:]))
		case "tags":
			os.Exit(tagsCmd(os.Args[2:]))
		case "jobs":
			os.Exit(jobsCmd(os.Args[2:]))
		case "htpasswd":
			os.Exit(htpasswdCmd(os.Args[2:]))
		case "version", "--version":
			os.Exit(versionCmd(os.Stdout, os.Args[2:]))
		case "help", "-h", "-help", "--help":
			fmt.Fprint(os.Stdout, usage)
			os.Exit(0)
		}
	}
	if len(os.Args) < 2 || os.Args[1] != "serve" {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file (see configs/mirror.yaml)")
	_ = fs.Parse(os.Args[2:])
	if strayArgs(os.Stderr, "serve", fs) {
		os.Exit(2)
	}

	// Start-up refusals are logged like everything after them (the
	// configured level is not known yet: info).
	boot := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := loadConfig(*cfgPath)
	if err == nil {
		err = cfg.ValidateSecret() // the peer protocol's; serve alone needs it
	}
	if err != nil {
		boot.Error("configuration refused", "err", err)
		os.Exit(2)
	}
	// The access policy is configuration too: check it before any work.
	policy, err := newPolicy(cfg)
	if err != nil {
		boot.Error("configuration refused", "err", fmt.Errorf("config: %w", err))
		os.Exit(2)
	}
	rules, err := compileRules(cfg)
	if err != nil {
		boot.Error("configuration refused", "err", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if cfg.TLS.CertFile == "" {
		// SIGHUP reloads the TLS pair; without TLS it must not kill the
		// process (its default action).
		signal.Ignore(syscall.SIGHUP)
	}
	if err := serve(ctx, cfg, policy, rules); err != nil {
		slog.Error("mirror stopped", "err", err)
		os.Exit(1)
	}
}

// newPolicy builds the client access policy. In pass-through mode a
// client's key is checked with its own upstream client and token exchange.
// A further upstream without credentials is public: its registry name is a
// public namespace (it serves the mirror only what it serves anyone); one
// with credentials needs access.rules (or its name in
// access.public_namespaces), and in pass-through mode is refused, as
// clients' keys are NGC keys.
func newPolicy(cfg config.Config) (*access.Policy, error) {
	origin := cfg.UpstreamURL()
	public := append([]string(nil), cfg.Access.PublicNamespaces...)
	for _, name := range cfg.UpstreamNames() {
		if u := cfg.Upstreams[name]; u.Username == "" && u.Password == "" {
			public = append(public, name)
		}
	}
	return access.New(access.Config{
		Mode:                cfg.Access.Mode,
		HtpasswdFile:        cfg.Access.HtpasswdFile,
		PublicNamespaces:    public,
		Groups:              cfg.Access.Groups,
		Rules:               accessRules(cfg.Access.Rules),
		TokenKeyFile:        cfg.Access.TokenKeyFile,
		TokenLifetime:       time.Duration(cfg.Access.TokenLifetime),
		PassthroughCacheTTL: time.Duration(cfg.Access.PassthroughTTL),
	}, func(ctx context.Context, key, repo string) (bool, error) {
		if reg, _ := names.SplitQualified(repo); reg != "" {
			return false, nil // a further upstream's repository: an NGC key says nothing about it
		}
		ct := auth.NewTransport(http.DefaultTransport, origin, auth.Credentials{Username: auth.DefaultUsername, Secret: key}, nil)
		c := upstream.New(origin, ct)
		if repo == "" {
			// A login: GET /v2/ makes the transport exchange the key
			// without a scope, which nvcr.io refuses for an unknown key.
			switch err := c.Ping(ctx); {
			case err == nil:
				return true, nil
			case auth.Refused(err):
				return false, nil
			default:
				return false, err
			}
		}
		return c.CanPull(ctx, repo)
	})
}

func serve(ctx context.Context, cfg config.Config, policy *access.Policy, rules []*prefetch.Rule) error {
	level, _ := cfg.Level()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)
	routeLogrus(log)
	// Settings that are valid but cannot do what they say (config.Warnings).
	for _, w := range cfg.Warnings() {
		log.LogAttrs(ctx, slog.LevelWarn, w.Message, w.Attrs...)
	}

	store, dataDir, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	// A filesystem cache is this process's alone: the lock of its data_dir
	// stops a second mirror there before it removes the first one's
	// uploads below (whatever state.path each has).
	lock, err := lockDataDir(store, dataDir, log)
	if err != nil {
		return err
	}
	defer lock.Release()
	st, stKind, err := openState(cfg, dataDir)
	if err != nil {
		return fmt.Errorf("state store: %w", err)
	}
	defer st.Close()
	spoolDir := cfg.Cache.SpoolDir
	if spoolDir == "" {
		spoolDir = filepath.Join(dataDir, "_spool")
	}
	// A cache that cannot be written (a read-only or full disk) still
	// serves what it holds: these are warnings, and /readyz reports it.
	if err := os.MkdirAll(spoolDir, 0o750); err != nil {
		log.Warn("cannot create the spool directory; cold blobs will be streamed without caching", "err", err)
	}
	// Crash safety: uploads and spools of fills that a crash interrupted.
	// A filesystem cache belongs to this process alone (it holds the data
	// dir's lock), so all its uploads go. A bucket may be shared by
	// replicas: there `mirror gc` removes uploads older than its grace
	// period instead.
	if store.Capabilities().Exclusive && lock != nil {
		if n, err := store.PurgeUploads(ctx); err != nil {
			log.Warn("cannot remove uploads of interrupted fills (they are never served)", "err", err)
		} else if n > 0 {
			log.Info("removed interrupted uploads", "count", n)
		}
		if n, err := store.PurgeTemporary(ctx); err != nil {
			log.Warn("cannot remove temporary files of interrupted writes (they are never served)", "err", err)
		} else if n > 0 {
			log.Info("removed temporary files of interrupted writes", "count", n)
		}
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
	b := currentBuild()
	metrics.BuildInfo(reg, b.Version, b.Revision, b.Go)
	metrics.StorageUsage(reg, func(kind string) (int64, int64) { return store.Usage(storage.Kind(kind)) })
	metrics.FilesystemUsage(reg, dataDir)
	origin := cfg.UpstreamURL()
	creds := auth.Credentials{Username: cfg.Upstream.Username, Secret: cfg.Upstream.APIKey}
	// The upstream's own transport, whose idle connections serve closes
	// when it returns.
	upstreamTransport := http.DefaultTransport.(*http.Transport).Clone()
	rt := auth.NewTransport(upstreamTransport, origin, creds, log.With("component", "auth"))
	up := upstream.New(origin, rt)
	registry := pull.RegistryName(up)
	instrument(up, rt, m, metrics.DefaultUpstream)
	ups, extraTransports, err := newUpstreams(cfg, up, m, log)
	if err != nil {
		return err
	}
	defer func() {
		for _, t := range extraTransports {
			t.CloseIdleConnections()
		}
	}()

	// The cache layout: a cache of an older layout is migrated, one of a
	// newer layout refused (never misread).
	if _, err := store.EnsureLayout(ctx, registry, log.With("component", "storage")); errors.Is(err, storage.ErrLayout) {
		return err
	} else if err != nil {
		log.Error("cannot bring the cache to the current layout; tags and links cached before are not used (read-only cache?)", "err", err)
	}

	// Cache budget and eviction (evict.go); evict.Unlimited without one.
	ev := newBudget(cfg, store, st, registry, reg, log)

	fills := fill.NewGroup(store, fill.Options{
		SpoolDir:           spoolDir,
		IdleTimeout:        time.Duration(cfg.Upstream.BlobIdleTimeout),
		StopWithoutClients: cfg.Cache.StopFillsWithoutClients,
		MaxFills:           cfg.Limits.MaxFills,
		MaxFillsPer:        fillBounds(cfg, registry),
		Budget:             ev, // evict.go
		Log:                log.With("component", "fill"),
		Metrics:            m,
	})
	// Scale-out (cluster.go): nil without cluster.advertise.
	so, err := newScaleOut(ctx, cfg, store, reg, log)
	if err != nil {
		return err
	}
	defer so.end()
	// The pull-through service: what clients, prefetch jobs and the admin
	// API are served from. Replicas on one bucket sharing Redis fetch a
	// manifest once between them (manifest leases, as the budget: evict.go).
	var leases pull.Leases
	if r, ok := sharedState(cfg, st); ok {
		leases = r
	}
	svc := pull.NewSet(ups, store, fills, pull.Options{
		Leases:          leases,
		LeaseScope:      budgetScope(cfg.Storage.S3),
		TagFreshness:    time.Duration(cfg.Cache.TagFreshness),
		UpstreamTimeout: time.Duration(cfg.Upstream.Timeout),
		CheckLinks:      policy != nil,
		Redirect:        store.Capabilities().Redirect,
		Cache:           ev, // evict.go
		Cluster:         so.cluster(),
		Log:             log.With("component", "pull"),
	})
	trk, err := newTracked(cfg, dataDir, st, stKind, rules, ups, svc, store, reg, log)
	if err != nil {
		return err
	}
	pinPrefetchRules(ev, trk.sched)
	h := proxy.New(svc, proxy.Options{
		Pulls:     trk.tracker,
		NSAliases: cfg.Upstream.NSAliases,
		Log:       log.With("component", "proxy"),
		Metrics:   m,
		Access:    policy,
		AccessLog: cfg.AccessLog,
	})
	hc := &health.Checker{
		StorageProbe: store.Probe,
		Upstreams:    upstreamChecks(ups),
		StateProbe: func(ctx context.Context) error {
			err := st.Ping(ctx)
			if errors.Is(err, state.ErrOff) {
				return fmt.Errorf("%w: %w", health.ErrStateOff, err)
			}
			return err
		},
		Cluster: so.ready(),
	}

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return listenError(cfg.Addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", hc.Healthz)
	mux.HandleFunc("/readyz", hc.Readyz)
	mux.Handle("/auth/token", h.Observe(policy.TokenHandler())) // in the access log too
	mux.Handle("/", h)
	mux.Handle(admin.Prefix+"/", trk.admin)
	var handler http.Handler = mux
	if n := cfg.Limits.RequestsPerSecond; n > 0 {
		handler = rateLimited(n, h.Observe, handler)
	}
	handler = limitBodies(handler)
	// Before any route: the mux would otherwise redirect a path with "."
	// or ".." segments to another repository before any route saw it.
	handler = proxy.RejectDotSegments(handler, h.Observe)
	// Outermost: the client address every layer inside reads (rate limit,
	// pull history, access log).
	trusted, _ := clientip.ParseTrusted(cfg.Server.TrustedProxies) // checked by config.Validate
	handler = clientip.Middleware(trusted)(handler)
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	var reloader *tlsreload.Reloader
	if cfg.TLS.CertFile != "" {
		if reloader, err = tlsreload.New(cfg.TLS.CertFile, cfg.TLS.KeyFile, log); err != nil {
			return err
		}
		srv.TLSConfig = reloader.Config()
	}
	log.Info("ngc-mirror listening", "version", b.Version, "revision", b.Revision, "addr", ln.Addr().String(), "tls", reloader != nil, "upstream", origin.String(),
		"credentials", creds, "access", cfg.Access.Mode, "public_namespaces", cfg.Access.PublicNamespaces,
		"storage", cfg.Storage.Driver, "data_dir", dataDir, "trusted_proxies", cfg.Server.TrustedProxies)

	// The components run until ctx ends (or one fails, which stops the
	// others); serve returns once every one of them, and every goroutine
	// it started, has returned.
	grace := time.Duration(cfg.Limits.ShutdownGrace)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return runHTTP(gctx, srv, ln, reloader != nil, grace, fills, log) })
	g.Go(func() error { return runTLSReload(gctx, reloader, log) })
	// A shared budget's exchanges start with serving, not after the
	// listing: the leader must know of this replica's responses at once.
	g.Go(func() error { ev.Share(gctx); return nil })
	so.run(g, svc, cfg.Cluster.Secret)
	g.Go(func() error {
		// One listing of the cache for its size and the evictor's index.
		start := time.Now()
		objs, err := store.Scan(gctx)
		if err != nil && gctx.Err() == nil {
			log.Warn("listing the cache failed; its size is undercounted and unlisted content is not evicted until the next start", "err", err)
		}
		ev.SeedObjects(objs)
		blobBytes, blobs := store.Usage(storage.KindBlob)
		manifestBytes, manifests := store.Usage(storage.KindManifest)
		log.Info("cache listed", "blobs", blobs, "manifests", manifests, "bytes", blobBytes+manifestBytes,
			"duration", time.Since(start).Round(time.Millisecond))
		ev.Run(gctx)
		return nil
	})
	g.Go(func() error { trk.tracker.Run(gctx); return nil })
	// Tag polls and scheduled gc run whether or not prefetch is enabled;
	// jobs and rule ticks need it (prefetch.Options.NoPrefetch). Jobs stop
	// with gctx (state saved: resumed at the next start).
	g.Go(func() error { trk.sched.Run(gctx); return nil })
	g.Go(func() error {
		pctx, cancel := context.WithTimeout(gctx, 15*time.Second)
		defer cancel()
		switch err := up.Ping(pctx); {
		case gctx.Err() != nil: // shutting down
		case auth.Refused(err) && creds.Secret != "":
			log.Error("the upstream refused the NGC API key: check NGC_API_KEY (or upstream.api_key, upstream.api_key_file) "+
				"and upstream.username ($oauthtoken); until then only cached content is served", "err", err)
		case auth.Refused(err):
			log.Error("the upstream refused anonymous access: set an NGC API key (NGC_API_KEY); "+
				"until then only cached content is served", "err", err)
		case err != nil:
			log.Warn("upstream not reachable yet; cached content is still served", "err", err)
		}
		// The further upstreams: each on its own, a failure concerns its
		// images only.
		for _, r := range ups.All()[1:] {
			switch err := r.Client.Ping(pctx); {
			case gctx.Err() != nil:
				return nil
			case auth.Refused(err):
				log.Error("the upstream refused the mirror's credentials: check upstreams."+r.Name+".username and password; "+
					"until then only its cached content is served", "upstream", r.Name, "err", err)
			case err != nil:
				log.Warn("upstream not reachable yet; its cached content is still served", "upstream", r.Name, "err", err)
			}
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		// Downloads finish within the grace period; the uploads of those
		// cut off are removed at the next start (PurgeUploads).
		sctx, cancel := context.WithTimeout(context.Background(), grace)
		defer cancel()
		if err := fills.Wait(sctx); err != nil {
			log.Warn("downloads cut off at the end of the grace period", "fills_in_flight", fills.InFlight())
		}
		so.end() // peers no longer stream from this replica's fills
		return nil
	})
	err = g.Wait()
	upstreamTransport.CloseIdleConnections()
	if err == nil {
		log.Info("ngc-mirror stopped") // a clean shutdown's last line
	}
	return err
}

// runHTTP serves on ln until ctx ends, then stops accepting connections and
// lets responses finish for grace.
func runHTTP(ctx context.Context, srv *http.Server, ln net.Listener, tls bool, grace time.Duration, fills *fill.Group, log *slog.Logger) error {
	errc := make(chan error, 1)
	go func() {
		if tls {
			errc <- srv.ServeTLS(ln, "", "")
		} else {
			errc <- srv.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: finishing responses and downloads", "grace", grace, "fills_in_flight", fills.InFlight())
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Warn("responses cut off at the end of the grace period", "err", err)
		_ = srv.Close()
	}
	<-errc // Serve has returned
	return nil
}

// listenError explains a failure to listen on addr and names the setting
// that changes it.
func listenError(addr string, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("%s is in use by another process (another mirror?): stop it, or listen elsewhere with MIRROR_ADDR or addr in the config (for example :5001): %w", addr, err)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("not allowed to listen on %s (ports below 1024 need CAP_NET_BIND_SERVICE): choose another port with MIRROR_ADDR or addr in the config (for example :5000): %w", addr, err)
	}
	return fmt.Errorf("cannot listen on %q (MIRROR_ADDR or addr in the config): %w", addr, err)
}

// runTLSReload reloads the certificate pair when its files change and on
// SIGHUP, until ctx ends (nothing to do without TLS).
func runTLSReload(ctx context.Context, reloader *tlsreload.Reloader, log *slog.Logger) error {
	if reloader == nil {
		return nil
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	done := make(chan struct{})
	go func() {
		defer close(done)
		reloader.Watch(ctx, 10*time.Second)
	}()
	defer func() { <-done }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hup:
			if err := reloader.Reload(); err != nil {
				log.Warn("SIGHUP: TLS certificate not reloaded", "err", err)
			} else {
				log.Info("SIGHUP: TLS certificate reloaded")
			}
		}
	}
}

// limitBodies caps request bodies at 1 MiB: the mirror is read-only and
// reads none, but nothing should be able to make it buffer one.
func limitBodies(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil {
			r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
		}
		next.ServeHTTP(w, r)
	})
}

// localBase returns the URL of the mirror this host runs with cfg
// (scheme://host:port, a wildcard listen address read as 127.0.0.1) and a
// transport for it. With TLS it skips certificate checks: the certificate
// names the mirror's public name, not 127.0.0.1, and this reaches the local
// process only.
func localBase(cfg config.Config) (string, *http.Transport, error) {
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return "", nil, fmt.Errorf("addr: %w", err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	scheme, tr := "http", &http.Transport{}
	if cfg.TLS.CertFile != "" {
		scheme, tr.TLSClientConfig = "https", &tls.Config{InsecureSkipVerify: true}
	}
	return scheme + "://" + net.JoinHostPort(host, port), tr, nil
}

// healthcheck asks the local mirror's /healthz and returns the exit code:
// 0 when healthy. It reads the address and TLS setting like serve does
// (--config FILE, then MIRROR_* env). Distroless images have no curl, so
// container health checks run this.
func healthcheck(args []string) int {
	fs := flag.NewFlagSet("healthcheck", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file")
	_ = fs.Parse(args)
	if strayArgs(os.Stderr, "healthcheck", fs) {
		return 2
	}
	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		return 2
	}
	base, tr, err := localBase(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		return 2
	}
	c := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	resp, err := c.Get(base + "/healthz")
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

// instrument reports an upstream client's exchanges, bytes, back-off
// refusals and token exchanges to m, labelled upstream=name (its registry
// name).
func instrument(c *upstream.Client, rt *auth.Transport, m *metrics.Metrics, name string) {
	um := m.For(name)
	rt.OnTokenExchange = um.TokenExchange
	c.OnBackoffRefusal = um.BackoffRefusal
	c.OnRequest = func(kind string, status int, d time.Duration) { um.Request(kind, status, d.Seconds()) }
	c.OnBytes = um.Received
}

// upstreamChecks are the /readyz pings of every upstream in ups, the
// default first; a credentials refusal (auth.Refused) is told apart from
// an upstream that does not answer.
func upstreamChecks(ups *upstream.Set) []health.UpstreamCheck {
	var checks []health.UpstreamCheck
	for i, r := range ups.All() {
		c := health.UpstreamCheck{Name: r.Name, Probe: func(ctx context.Context) error {
			err := r.Client.Ping(ctx)
			if auth.Refused(err) {
				return fmt.Errorf("%w: %w", health.ErrCredentialsRefused, err)
			}
			return err
		}}
		if i > 0 {
			c.Credentials = "upstreams." + r.Name + ".username and password"
		} else {
			c.Name = metrics.DefaultUpstream // as its metrics name it, whatever upstream.url's host
		}
		checks = append(checks, c)
	}
	return checks
}

// newUpstreams returns the set of upstreams: def, the default (nvcr.io),
// and cfg.Upstreams, each with a client over an auth.Transport and an
// http.Transport of its own (returned, for closing their idle
// connections), so that tokens and a 429 back-off stay per upstream.
func newUpstreams(cfg config.Config, def *upstream.Client, m *metrics.Metrics, log *slog.Logger) (*upstream.Set, []*http.Transport, error) {
	var others []*upstream.Registry
	var transports []*http.Transport
	for _, name := range cfg.UpstreamNames() {
		u := cfg.Upstreams[name]
		origin := cfg.ExtraUpstreamURL(name)
		creds := auth.Credentials{Username: u.Username, Secret: u.Password}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		rt := auth.NewTransport(tr, origin, creds, log.With("component", "auth", "upstream", name))
		c := upstream.New(origin, rt)
		instrument(c, rt, m, name)
		transports = append(transports, tr)
		others = append(others, &upstream.Registry{Name: name, Client: c, TagFreshness: time.Duration(u.TagFreshness),
			Repositories: u.Repositories, RootHosts: u.RootHosts})
		log.Info("upstream", "registry", name, "url", origin.String(), "credentials", creds,
			"repositories", u.Repositories, "root_hosts", u.RootHosts, "max_fills", u.MaxFills)
	}
	set, err := upstream.NewSet(&upstream.Registry{Name: pull.RegistryName(def), Client: def}, cfg.Upstream.NSAliases, others...)
	if err != nil {
		return nil, nil, fmt.Errorf("config: %w", err)
	}
	return set, transports, nil
}

// fillBounds returns the fill bounds of the upstreams that have one
// (upstream.max_fills for the default, named registry, and
// upstreams.<name>.max_fills), keyed by registry name as pull passes them
// to fill.Group.Join.
func fillBounds(cfg config.Config, registry string) map[string]int {
	bounds := map[string]int{}
	if cfg.Upstream.MaxFills > 0 {
		bounds[registry] = cfg.Upstream.MaxFills
	}
	for name, u := range cfg.Upstreams {
		if u.MaxFills > 0 {
			bounds[name] = u.MaxFills
		}
	}
	return bounds
}

func accessRules(in []config.AccessRule) []access.Rule {
	out := make([]access.Rule, len(in))
	for i, r := range in {
		out[i] = access.Rule{Repositories: r.Repositories, Users: r.Users}
	}
	return out
}
