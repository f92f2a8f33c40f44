package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ngc-mirror/ngc-mirror/internal/admin"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/evict"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// openState opens Redis when configured, else the embedded store in the
// data directory.
func openState(cfg config.Config, dataDir string) (st state.Store, kind string, err error) {
	if cfg.State.RedisURL != "" {
		r, err := state.OpenRedis(cfg.State.RedisURL, state.RedisOptions{
			Prefix: cfg.State.RedisPrefix, Timeout: time.Duration(cfg.State.Timeout)})
		return r, "redis " + redisHost(cfg.State.RedisURL), err
	}
	path := cfg.State.Path
	if path == "" {
		path = filepath.Join(dataDir, "state.db")
	}
	b, err := openBolt(path)
	switch {
	case errors.Is(err, state.ErrLocked):
		return nil, "", fmt.Errorf("%w: is another mirror running on this data_dir? Stop it, or give this one its own "+
			"data_dir (MIRROR_DATA_DIR) and state.path, or let replicas share state through state.redis_url (MIRROR_REDIS_URL)", err)
	case unwritable(err):
		// A read-only data disk: serve what the cache holds without state
		// (README, "Health"); newTracked warns.
		return state.Off(err), stateOff, nil
	case err != nil:
		return nil, "", err
	}
	return b, "embedded " + path, nil
}

// stateOff is the kind of a state store that could not be opened for
// writing.
const stateOff = "off"

func openBolt(path string) (*state.Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	return state.OpenBolt(path, 5*time.Second)
}

// unwritable reports whether err says that a file may not be created or
// written (permissions, a read-only filesystem).
func unwritable(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)
}

// compileRules validates the configured prefetch rules.
func compileRules(cfg config.Config) ([]*prefetch.Rule, error) {
	if _, err := prefetch.ParseSchedule(cfg.Tracking.Poll); err != nil {
		return nil, fmt.Errorf("config: tracking.poll: %w", err)
	}
	if cfg.Cache.GCSchedule != "" {
		if _, err := prefetch.ParseSchedule(cfg.Cache.GCSchedule); err != nil {
			return nil, fmt.Errorf("config: cache.gc_schedule: %w", err)
		}
	}
	var rules []*prefetch.Rule
	for _, spec := range cfg.Prefetch.Rules {
		r, err := prefetch.Compile(spec)
		if err != nil {
			return nil, fmt.Errorf("config: prefetch.rules: %w", err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// tracked is the wiring of tag tracking, prefetch and the admin API.
type tracked struct {
	store   state.Store
	tracker *tracking.Tracker
	sched   *prefetch.Scheduler
	admin   http.Handler
	m       *metrics.Tracking
}

// newTracked builds tag tracking, the prefetch scheduler and the admin API
// over the pull-through service (run by serve). st and kind come from
// openState.
func newTracked(cfg config.Config, dataDir string, st state.Store, kind string, rules []*prefetch.Rule, up *upstream.Set,
	svc *pull.Service, cache *storage.Store, reg prometheus.Registerer, log *slog.Logger) (*tracked, error) {
	tm := metrics.NewTracking(reg)
	repos := append([]string(nil), cfg.Tracking.Repositories...)
	for _, r := range rules {
		repos = append(repos, r.Literal()...)
	}
	trk := tracking.New(st, up, tracking.Options{
		Repositories: repos,
		Recent:       time.Duration(cfg.Tracking.Recent),
		StoreTimeout: time.Duration(cfg.State.Timeout),
		Log:          log.With("component", "tracking"),
		Metrics:      tm,
	})
	log.Info("state store", "kind", kind)
	pctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if kind == stateOff {
		log.Warn("state store off: the state file cannot be written (read-only data disk?); serving the cache without "+
			"tag tracking, pull history and prefetch jobs. Set state.path to a writable file, or state.redis_url",
			"err", st.Ping(pctx))
	} else if err := st.Ping(pctx); err != nil {
		// Not fatal: pulls never need it, and the client reconnects.
		log.Warn("state store not reachable; tag tracking, pull history and prefetch wait for it", "store", kind, "err", err)
	}
	t := &tracked{store: st, tracker: trk, m: tm}
	sched, err := prefetch.New(t.store, t.tracker, svc, prefetch.Options{
		Rules:        rules,
		PollSchedule: cfg.Tracking.Poll,
		Auto:         cfg.Prefetch.Auto.Enabled,
		AutoWindow:   time.Duration(cfg.Prefetch.Auto.Window),
		MaxJobs:      cfg.Prefetch.MaxJobs,
		Tasks:        gcTask(cfg, cache, log),
		NoPrefetch:   !cfg.Prefetch.Enabled,
		Log:          log.With("component", "prefetch"),
		Metrics:      t.m,
	})
	if err != nil {
		return nil, err
	}
	t.sched = sched
	token, src, err := adminToken(cfg, dataDir)
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(src, "not written") {
		log.Warn("admin API", "prefix", admin.Prefix+"/", "token", src)
	} else {
		log.Info("admin API", "prefix", admin.Prefix+"/", "token", src)
	}
	t.admin = admin.New(sched, t.tracker, svc, admin.Options{
		Token:            token,
		UpstreamHosts:    cfg.UpstreamHosts(),
		Upstreams:        cfg.UpstreamNames(),
		PrefetchDisabled: !cfg.Prefetch.Enabled,
		Log:              log.With("component", "admin"),
		Metrics:          t.m,
	})
	return t, nil
}

// adminToken returns the admin API token: admin.token / MIRROR_ADMIN_TOKEN
// / admin.token_file, else the one in <data_dir>/admin-token, created
// (random, mode 0600) on first start. src names where it came from, never
// the token.
func adminToken(cfg config.Config, dataDir string) (token, src string, err error) {
	if cfg.Admin.Token != "" {
		return cfg.Admin.Token, "from the configuration", nil
	}
	path := filepath.Join(dataDir, "admin-token")
	if token := readAdminToken(dataDir); token != "" {
		return token, "in " + path, nil
	}
	token = randomHex(24)
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		if unwritable(err) {
			// A read-only data disk: the mirror serves anyway; the admin
			// API then takes a token nobody knows.
			return token, "not written (" + path + " is not writable: set admin.token or MIRROR_ADMIN_TOKEN to use the admin API)", nil
		}
		return "", "", fmt.Errorf("admin token: %w", err)
	}
	return token, "created in " + path, nil
}

// readAdminToken returns the token in <dataDir>/admin-token, or "".
func readAdminToken(dataDir string) string {
	raw, err := os.ReadFile(filepath.Join(dataDir, "admin-token"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(raw))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// noTokenError says where the admin token was looked for and how to point
// the command at the running mirror's configuration.
func noTokenError(dataDir string) error {
	path := filepath.Join(dataDir, "admin-token")
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return fmt.Errorf("no admin token in %s: give the running mirror's configuration (--config FILE or MIRROR_CONFIG; default %s), "+
		"run as a user who can read its data directory, or set MIRROR_ADMIN_TOKEN or --token", path, config.DefaultPath)
}

// pinPrefetchRules keeps the images of prefetch rules with pin: true out of
// eviction (nothing to do without a budget).
func pinPrefetchRules(ev budget, sched *prefetch.Scheduler) {
	ev.SetPinSource("prefetch rules", func(ctx context.Context) ([]evict.Pin, error) {
		targets, err := sched.PinnedTargets(ctx)
		if err != nil {
			return nil, err
		}
		pins := make([]evict.Pin, 0, len(targets))
		for _, t := range targets {
			p := evict.Pin{Repository: t.Repository}
			if d, err := digest.Parse(t.Reference); err == nil {
				p.Digest = d
			} else {
				p.Tag = t.Reference
			}
			pins = append(pins, p)
		}
		return pins, nil
	})
}

// redisHost names a Redis URL's host and database for logs, never its
// password.
func redisHost(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Host + u.Path
}

// gcTask is the scheduled garbage collection (cache.gc_schedule), or none.
func gcTask(cfg config.Config, cache *storage.Store, log *slog.Logger) []prefetch.Task {
	if cfg.Cache.GCSchedule == "" {
		return nil
	}
	grace := time.Duration(cfg.Cache.GCGrace)
	log = log.With("component", "gc")
	return []prefetch.Task{{Name: "gc", Schedule: cfg.Cache.GCSchedule, Run: func(ctx context.Context) {
		res, err := cache.GC(ctx, grace, false)
		if err != nil {
			log.Warn("scheduled gc failed", "err", err)
			return
		}
		log.Info("scheduled gc", "blobs", res.Blobs, "blob_bytes", res.BlobBytes, "uploads", res.Uploads, "upload_bytes", res.UploadBytes)
	}}}
}
