// Package prefetchtest builds a whole mirror in process for tests of
// tracking, prefetch and the admin API: the fake nvcr.io (internal/ngctest)
// with its fixture, a filesystem cache, the fill group, the pull-through
// service and the registry handler over it on a loopback HTTP server, a state store (embedded bbolt or a
// real redis-server), the tracker and the scheduler.
package prefetchtest

import (
	"context"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/proxy"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/state/redistest"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Options shape a World.
type Options struct {
	// Redis, when set, keeps state there instead of in an embedded file.
	Redis *redistest.Server
	// Rules are compiled for the scheduler.
	Rules []prefetch.RuleSpec
	// Prefetch options (Rules, Metrics and Log are set by the world);
	// LockTTL defaults to 600 ms here so that failover tests are quick.
	Prefetch prefetch.Options
	// Tracking options (Metrics is set by the world).
	Tracking tracking.Options
	// LayerSize of the fixture (default 64 KiB).
	LayerSize int64
	// Upstream, when set, is used instead of a new fake (a second replica
	// of the same lab); CacheDir likewise shares a cache.
	Upstream *ngctest.Upstream
	Fixture  *ngctest.Fixture
	CacheDir string
	StateDir string
	// MaxFills bounds the fill group (limits.max_fills; 0: none).
	MaxFills int
	// Via, when set, serves the world's fake (Up, Fx) as the further
	// upstream of that registry name, with another fake (Default) as the
	// default upstream: repositories are then named Via/path (World.Q).
	Via string
}

// World is a mirror in process.
type World struct {
	Up *ngctest.Upstream
	Fx *ngctest.Fixture
	// Default is the default upstream with Options.Via (nil otherwise);
	// Via the registry name Up is served as.
	Default *ngctest.Upstream
	Via     string
	Cache   *storage.Store
	Fills   *fill.Group
	Pull    *pull.Service
	Proxy   *proxy.Handler
	Server  *httptest.Server
	State   state.Store
	Tracker *tracking.Tracker
	Sched   *prefetch.Scheduler
	Metrics *metrics.Tracking
	Reg     *prometheus.Registry
}

// New builds a world; nothing runs until Start.
func New(t *testing.T, o Options) *World {
	t.Helper()
	w := &World{Up: o.Upstream, Fx: o.Fixture, Via: o.Via}
	if w.Up == nil {
		w.Up = ngctest.New(ngctest.Options{})
		t.Cleanup(w.Up.Close)
		if o.LayerSize == 0 {
			o.LayerSize = 64 << 10
		}
		fx, err := w.Up.Populate(o.LayerSize)
		if err != nil {
			t.Fatal(err)
		}
		w.Fx = fx
	}
	dir := o.CacheDir
	if dir == "" {
		dir = t.TempDir()
	}
	w.Cache = storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 50}), storage.WithLocalRoot(dir))
	origin, _ := url.Parse(w.Up.URL())
	client := upstream.New(origin, auth.NewTransport(nil, origin, auth.Credentials{}, nil))
	ups := upstream.Single(client)
	if o.Via != "" {
		w.Default = ngctest.New(ngctest.Options{})
		t.Cleanup(w.Default.Close)
		t.Cleanup(func() { // before Close
			if n := len(w.Default.Requests()); n != 0 {
				t.Errorf("the default upstream saw %d requests in a world of the further upstream %s: %v", n, o.Via, w.Default.Requests())
			}
		})
		dorigin, _ := url.Parse(w.Default.URL())
		def := upstream.New(dorigin, auth.NewTransport(nil, dorigin, auth.Credentials{}, nil))
		var err error
		if ups, err = upstream.NewSet(&upstream.Registry{Name: pull.RegistryName(def), Client: def}, []string{"nvcr.io"},
			&upstream.Registry{Name: o.Via, Client: client}); err != nil {
			t.Fatal(err)
		}
	}
	w.Fills = fill.NewGroup(w.Cache, fill.Options{SpoolDir: t.TempDir(), IdleTimeout: 5 * time.Second, MaxFills: o.MaxFills})
	// Fills outlive their clients (a stopped world's too): let a commit
	// finish before a test's cache directory is removed (cleanups run
	// last-registered first).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = w.Fills.Wait(ctx)
	})

	if o.Redis != nil {
		r, err := state.OpenRedis(o.Redis.URL, state.RedisOptions{Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		w.State = r
	} else {
		sd := o.StateDir
		if sd == "" {
			sd = t.TempDir()
		}
		b, err := state.OpenBolt(filepath.Join(sd, "state.db"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		w.State = b
	}
	t.Cleanup(func() { w.State.Close() })
	w.Reg = prometheus.NewRegistry()
	w.Metrics = metrics.NewTracking(w.Reg)
	to := o.Tracking
	to.Metrics = w.Metrics
	w.Tracker = tracking.New(w.State, ups, to)
	w.Pull = pull.NewSet(ups, w.Cache, w.Fills, pull.Options{})
	w.Proxy = proxy.New(w.Pull, proxy.Options{Pulls: w.Tracker, NSAliases: []string{"nvcr.io"}})
	w.Server = httptest.NewServer(w.Proxy)
	t.Cleanup(w.Server.Close)

	po := o.Prefetch
	for _, spec := range o.Rules {
		r, err := prefetch.Compile(spec)
		if err != nil {
			t.Fatal(err)
		}
		po.Rules = append(po.Rules, r)
	}
	po.Metrics = w.Metrics
	if po.LockTTL == 0 {
		po.LockTTL = 600 * time.Millisecond
	}
	if po.SaveInterval == 0 {
		po.SaveInterval = 50 * time.Millisecond
	}
	if po.Owner == "" {
		po.Owner = t.Name()
	}
	s, err := prefetch.New(w.State, w.Tracker, w.Pull, po)
	if err != nil {
		t.Fatal(err)
	}
	w.Sched = s
	return w
}

// Q is the qualified name of repository (or pattern) name of the world's
// fake: name itself, or with Options.Via, Via/name.
func (w *World) Q(name string) string {
	if w.Via == "" {
		return name
	}
	return w.Via + "/" + name
}

// Start runs the tracker's writer and the scheduler until the returned
// stop is called (or the test ends). stop waits for them to return.
func (w *World) Start(t *testing.T) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Both return when ctx ends; stop waits for both, so nothing they
		// write (the bbolt file in the test's TempDir) outlives the test.
		tracker := make(chan struct{})
		go func() {
			defer close(tracker)
			w.Tracker.Run(ctx)
		}()
		w.Sched.Run(ctx)
		<-tracker
	}()
	var once bool
	stop = func() {
		if once {
			return
		}
		once = true
		cancel()
		<-done
	}
	t.Cleanup(stop)
	return stop
}

// WaitJob polls job id until it ends or timeout passes, and returns it.
func (w *World) WaitJob(t *testing.T, id string, timeout time.Duration) state.Job {
	t.Helper()
	var j state.Job
	var err error
	if !testsupport.Until(timeout, 20*time.Millisecond, func() bool {
		j, err = w.State.Job(context.Background(), id)
		return err == nil && j.Ended()
	}) {
		t.Fatalf("job %s did not end within %v: %+v (err %v)", id, timeout, j, err)
	}
	return j
}
