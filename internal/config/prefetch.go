package config

import (
	"errors"
	"fmt"
	"time"
)

// State selects where tag tracking, pull history and prefetch jobs are
// kept: Redis when RedisURL is set (shared by replicas), else an embedded
// file in the data directory.
type State struct {
	// RedisURL: redis://[:password@]host:port/db or rediss:// (TLS).
	// Secret when it holds a password: prefer MIRROR_REDIS_URL.
	RedisURL    string `yaml:"redis_url"`
	RedisPrefix string `yaml:"redis_prefix"` // key prefix (default "ngc-mirror:")
	// Timeout bounds each state operation (default 1s); requests never
	// wait on the state store.
	Timeout Duration `yaml:"timeout"`
	// Path of the embedded store (default <data_dir>/state.db).
	Path string `yaml:"path"`
}

// Tracking configures tag polling and pull history.
type Tracking struct {
	// Repositories are always tracked; repositories clients pulled within
	// Recent and the plain names of prefetch rules are tracked too.
	Repositories []string `yaml:"repositories"`
	// Poll is the cron expression of tag polling ("@every 1h", "*/30 * * * *").
	Poll   string   `yaml:"poll"`
	Recent Duration `yaml:"recent"`
}

// Prefetch configures pre-warming.
type Prefetch struct {
	// Enabled runs prefetch rules, the automatic rule and jobs in this
	// process. Tag polls and scheduled gc (cache.gc_schedule) run either way.
	Enabled bool `yaml:"enabled"`
	// MaxJobs bounds jobs running at once.
	MaxJobs int            `yaml:"max_jobs"`
	Auto    AutoPrefetch   `yaml:"auto"`
	Rules   []PrefetchRule `yaml:"rules"`
}

// AutoPrefetch is the automatic rule: when a new monthly release appears
// for a variant that nodes pulled within Window, prefetch it for the
// platforms they pulled.
type AutoPrefetch struct {
	Enabled bool     `yaml:"enabled"`
	Window  Duration `yaml:"window"`
}

// PrefetchRule selects images to pre-warm on a schedule (see
// internal/prefetch for the semantics of each field).
type PrefetchRule struct {
	Name string `yaml:"name" json:"name"`
	// Repositories: names or globs ("nvidia/*", "nvidia/**").
	Repositories []string  `yaml:"repositories" json:"repositories"`
	Tags         TagSelect `yaml:"tags" json:"tags"`
	Variants     []string  `yaml:"variants" json:"variants,omitempty"`
	Platforms    []string  `yaml:"platforms" json:"platforms,omitempty"`
	Schedule     string    `yaml:"schedule" json:"schedule,omitempty"`
	Concurrency  int       `yaml:"concurrency" json:"concurrency,omitempty"`
	// Bandwidth in bytes per second ("100MiB"), 0 for none.
	Bandwidth Size `yaml:"bandwidth" json:"bandwidth,omitempty"`
	Pin       bool `yaml:"pin" json:"pin,omitempty"`
}

// TagSelect selects tags: any of a regex (whole name), the latest N
// monthly releases, or exact names.
type TagSelect struct {
	Regex  string   `yaml:"regex" json:"regex,omitempty"`
	Latest int      `yaml:"latest" json:"latest,omitempty"`
	Exact  []string `yaml:"exact" json:"exact,omitempty"`
}

// Admin configures the management API under /admin/v1/.
type Admin struct {
	// Token is the bearer token of the admin API (secret: prefer
	// MIRROR_ADMIN_TOKEN or TokenFile). With neither, the mirror creates a
	// random one in <data_dir>/admin-token on first start.
	Token     string `yaml:"token"`
	TokenFile string `yaml:"token_file"`
}

func defaultTracking() (State, Tracking, Prefetch) {
	return State{Timeout: Duration(time.Second)},
		Tracking{Poll: "@every 1h", Recent: Duration(30 * 24 * time.Hour)},
		Prefetch{Enabled: true, MaxJobs: 2, Auto: AutoPrefetch{Enabled: true, Window: Duration(14 * 24 * time.Hour)}}
}

func (c Config) validateTracking() []error {
	var errs []error
	if c.State.Timeout <= 0 {
		errs = append(errs, errors.New("state.timeout must be positive"))
	}
	if c.Tracking.Recent < 0 || c.Prefetch.Auto.Window < 0 {
		errs = append(errs, errors.New("tracking.recent and prefetch.auto.window must not be negative"))
	}
	if c.Prefetch.MaxJobs < 0 {
		errs = append(errs, errors.New("prefetch.max_jobs must not be negative"))
	}
	names := map[string]bool{}
	for i, r := range c.Prefetch.Rules {
		if names[r.Name] {
			errs = append(errs, fmt.Errorf("prefetch.rules[%d]: duplicate name %q", i, r.Name))
		}
		names[r.Name] = true
	}
	return errs
}
