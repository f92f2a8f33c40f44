// Package config loads the mirror's configuration: defaults, then a YAML
// file, then MIRROR_* / NGC_API_KEY environment variables, then validation.
// The rest of the program receives the typed Config and never reads the
// environment itself.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ngc-mirror/ngc-mirror/internal/clientip"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// Config is the whole configuration. configs/mirror.yaml documents each key.
type Config struct {
	Addr     string `yaml:"addr"`
	LogLevel string `yaml:"log_level"`
	// AccessLog writes a line per registry request at info level (method,
	// route kind, repository, status, bytes, duration, cache result,
	// client); false leaves it to the debug level.
	AccessLog bool     `yaml:"access_log"`
	Server    Server   `yaml:"server"`
	Upstream  Upstream `yaml:"upstream"`
	// Upstreams are further registries beside Upstream (the default,
	// nvcr.io), keyed by registry name (docker.io, ghcr.io).
	Upstreams map[string]ExtraUpstream `yaml:"upstreams"`
	Storage   Storage                  `yaml:"storage"`
	Cache     Cache                    `yaml:"cache"`
	Access    Access                   `yaml:"access"`
	TLS       TLS                      `yaml:"tls"`
	Limits    Limits                   `yaml:"limits"`
	State     State                    `yaml:"state"`
	Tracking  Tracking                 `yaml:"tracking"`
	Prefetch  Prefetch                 `yaml:"prefetch"`
	Admin     Admin                    `yaml:"admin"`
	Cluster   Cluster                  `yaml:"cluster"`
}

// Server configures the client listener beside Addr.
type Server struct {
	// TrustedProxies are the load balancers in front of the mirror (CIDR
	// prefixes or addresses): a request from one of them is the client's
	// at the right-most X-Forwarded-For address that is not one of them,
	// for limits.requests_per_second, the pull history and the access log.
	// From any other peer the header is ignored. Empty: the peer is the
	// client.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// Limits protect the mirror from overload and abuse.
type Limits struct {
	// MaxFills bounds concurrent upstream blob downloads; a miss beyond it
	// gets 503 with Retry-After (0: no bound).
	MaxFills int `yaml:"max_fills"`
	// RequestsPerSecond per client IP (0: off), with bursts up to one
	// second's worth.
	RequestsPerSecond int `yaml:"requests_per_second"`
	// ShutdownGrace is how long SIGTERM waits for responses and fills.
	ShutdownGrace Duration `yaml:"shutdown_grace"`
}

// Access configures who may pull what (see internal/access).
type Access struct {
	// Mode: none, htpasswd, token or passthrough.
	Mode             string              `yaml:"mode"`
	HtpasswdFile     string              `yaml:"htpasswd_file"`
	PublicNamespaces []string            `yaml:"public_namespaces"`
	Groups           map[string][]string `yaml:"groups"`
	Rules            []AccessRule        `yaml:"rules"`
	TokenKeyFile     string              `yaml:"token_key_file"`
	TokenLifetime    Duration            `yaml:"token_lifetime"`
	PassthroughTTL   Duration            `yaml:"passthrough_cache_ttl"`
}

// AccessRule lets users pull repositories (patterns with * and **).
type AccessRule struct {
	Repositories []string `yaml:"repositories"`
	Users        []string `yaml:"users"`
}

// TLS serves HTTPS (and HTTP/2) with a certificate and key, reloaded when
// the files change or on SIGHUP. Both empty: plain HTTP.
type TLS struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// Upstream is the registry the mirror pulls through from.
type Upstream struct {
	URL      string `yaml:"url"`
	Username string `yaml:"username"`
	// APIKey is the NGC API key (secret). Prefer NGC_API_KEY or APIKeyFile.
	APIKey     string   `yaml:"api_key"`
	APIKeyFile string   `yaml:"api_key_file"`
	NSAliases  []string `yaml:"ns_aliases"`
	// Timeout bounds one manifest or tag-list exchange.
	Timeout Duration `yaml:"timeout"`
	// BlobIdleTimeout aborts a blob fill when the upstream sends nothing for
	// this long. There is no total deadline on blobs.
	BlobIdleTimeout Duration `yaml:"blob_idle_timeout"`
	// MaxFills bounds this upstream's blob downloads at once, beside
	// limits.max_fills (0: that bound only); as upstreams.<name>.max_fills.
	MaxFills int `yaml:"max_fills"`
}

// Storage selects the cache's storage driver.
type Storage struct {
	// Driver: "filesystem" (the cache in DataDir) or "s3" (the cache in a
	// bucket; DataDir then only holds the fills' spool files).
	Driver  string `yaml:"driver"`
	DataDir string `yaml:"data_dir"`
	S3      S3     `yaml:"s3"`
}

// S3 configures the cache on an S3-compatible store (distribution's
// s3-aws driver). Empty credentials use the standard AWS chain
// (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, shared config, instance role).
type S3 struct {
	Bucket    string `yaml:"bucket"`
	Region    string `yaml:"region"`
	Endpoint  string `yaml:"endpoint"` // e.g. http://minio:9000; empty: AWS
	PathStyle bool   `yaml:"path_style"`
	Prefix    string `yaml:"prefix"` // key prefix inside the bucket
	AccessKey string `yaml:"access_key"`
	// SecretKey is a secret: prefer MIRROR_S3_SECRET_KEY or the AWS chain.
	SecretKey string `yaml:"secret_key"`
	// ChunkSize of multipart uploads in bytes (at least 5 MiB).
	ChunkSize int64 `yaml:"chunk_size"`
	// Redirect answers cache-hit blob GETs with a redirect to a short-lived
	// presigned URL, so the bytes flow from S3 to the node.
	Redirect bool `yaml:"redirect"`
}

// Cache tunes caching.
type Cache struct {
	TagFreshness Duration `yaml:"tag_freshness"`
	SpoolDir     string   `yaml:"spool_dir"`
	// StopFillsWithoutClients cancels a blob download when every client
	// asking for it has gone. Off by default: the blob is cached anyway.
	StopFillsWithoutClients bool `yaml:"stop_fills_without_clients"`
	// MaxSize is the most bytes of blobs and manifests the cache holds
	// (0: no limit). Over it, the least recently used content is evicted
	// down to 90% of it.
	MaxSize Size `yaml:"max_size"`
	// MinFree is the free space to keep on the filesystem holding the
	// cache: bytes or a percentage of it (zero: none). Filesystem driver
	// only.
	MinFree FreeSpace `yaml:"min_free"`
	// EvictInterval is how often the budget is checked besides after
	// each commit that crosses it.
	EvictInterval Duration `yaml:"evict_interval"`
	// GCSchedule runs the cache's garbage collection (as `mirror gc`) on
	// this cron expression; empty: only by hand. GCGrace spares blobs and
	// uploads younger than it.
	GCSchedule string   `yaml:"gc_schedule"`
	GCGrace    Duration `yaml:"gc_grace"`
	// Pin lists images eviction never removes: "repository:tag" (what the
	// tag points at in the cache) or "repository@digest"; an index keeps
	// its child manifests and all their blobs.
	Pin []string `yaml:"pin"`
}

// Duration is a time.Duration written as "30s", "5m" in YAML.
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (like 30s, 5m): %w", n.Line, n.Value, err)
	}
	*d = Duration(v)
	return nil
}

// Default returns the embedded defaults: listen on :5000, anonymous nvcr.io,
// cache in ./data on the local filesystem.
func Default() Config {
	st, tr, pf := defaultTracking()
	return Config{
		State:     st,
		Tracking:  tr,
		Prefetch:  pf,
		Cluster:   defaultCluster(),
		Addr:      ":5000",
		LogLevel:  "info",
		AccessLog: true,
		Upstream: Upstream{
			URL:             "https://nvcr.io",
			Username:        "$oauthtoken",
			Timeout:         Duration(30 * time.Second),
			BlobIdleTimeout: Duration(60 * time.Second),
		},
		Storage: Storage{Driver: "filesystem", DataDir: "./data"},
		Cache:   Cache{TagFreshness: Duration(5 * time.Minute), EvictInterval: Duration(time.Minute), GCGrace: Duration(time.Hour)},
		Limits:  Limits{MaxFills: 64, ShutdownGrace: Duration(30 * time.Second)},
		Access: Access{
			Mode: "none",
			// nvcr.io serves these to anonymous clients; everything else
			// (a lab's private org) needs an authenticated, allowed client.
			PublicNamespaces: []string{"nvidia"},
			TokenLifetime:    Duration(15 * time.Minute),
			PassthroughTTL:   Duration(time.Minute),
		},
	}
}

// Load builds the configuration from the defaults, the YAML file at path
// (skipped when path is ""), and the environment given by getenv. Unknown
// YAML keys are errors.
func Load(path string, getenv func(string) string) (Config, error) {
	c := Default()
	if path != "" {
		raw, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("config: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(raw))
		dec.KnownFields(true)
		if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) { // an empty file is fine
			return c, fmt.Errorf("config: %s: %w", path, explain(raw, err))
		}
		if err := wholeNumbers(raw); err != nil {
			return c, fmt.Errorf("config: %s: %w", path, err)
		}
	}
	for env, dst := range map[string]*string{
		"MIRROR_ADDR":              &c.Addr,
		"MIRROR_UPSTREAM":          &c.Upstream.URL,
		"NGC_API_KEY":              &c.Upstream.APIKey,
		"MIRROR_UPSTREAM_USERNAME": &c.Upstream.Username,
		"MIRROR_DATA_DIR":          &c.Storage.DataDir,
		"MIRROR_STORAGE_DRIVER":    &c.Storage.Driver,
		"MIRROR_S3_BUCKET":         &c.Storage.S3.Bucket,
		"MIRROR_S3_REGION":         &c.Storage.S3.Region,
		"MIRROR_S3_ENDPOINT":       &c.Storage.S3.Endpoint,
		"MIRROR_S3_ACCESS_KEY":     &c.Storage.S3.AccessKey,
		"MIRROR_S3_SECRET_KEY":     &c.Storage.S3.SecretKey,
		"MIRROR_LOG_LEVEL":         &c.LogLevel,
		"MIRROR_ACCESS_MODE":       &c.Access.Mode,
		"MIRROR_HTPASSWD_FILE":     &c.Access.HtpasswdFile,
		"MIRROR_TLS_CERT_FILE":     &c.TLS.CertFile,
		"MIRROR_TLS_KEY_FILE":      &c.TLS.KeyFile,
		"MIRROR_REDIS_URL":         &c.State.RedisURL,
		"MIRROR_ADMIN_TOKEN":       &c.Admin.Token,
	} {
		if v := getenv(env); v != "" {
			*dst = v
		}
	}
	for env, dst := range map[string]*bool{
		"MIRROR_ACCESS_LOG":    &c.AccessLog,
		"MIRROR_S3_PATH_STYLE": &c.Storage.S3.PathStyle,
		"MIRROR_S3_REDIRECT":   &c.Storage.S3.Redirect,
	} {
		if v := getenv(env); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return c, fmt.Errorf("config: %s=%q: want true or false", env, v)
			}
			*dst = b
		}
	}
	if v := getenv("MIRROR_NS_ALIASES"); v != "" {
		// Comma-separated, like "nvcr.io,nvcr.example.lab"; it replaces
		// the file's list.
		c.Upstream.NSAliases = splitList(v)
	}
	if v := getenv("MIRROR_TRUSTED_PROXIES"); v != "" {
		// Comma-separated, like MIRROR_NS_ALIASES; it replaces the file's
		// list.
		c.Server.TrustedProxies = splitList(v)
	}
	if v := getenv("MIRROR_CACHE_MAX_SIZE"); v != "" {
		n, err := ParseSize(v)
		if err != nil {
			return c, fmt.Errorf("config: MIRROR_CACHE_MAX_SIZE: %w", err)
		}
		c.Cache.MaxSize = Size(n)
	}
	if v := getenv("MIRROR_CACHE_MIN_FREE"); v != "" {
		f, err := ParseFreeSpace(v)
		if err != nil {
			return c, fmt.Errorf("config: MIRROR_CACHE_MIN_FREE: %w", err)
		}
		c.Cache.MinFree = f
	}
	if c.Admin.Token == "" && c.Admin.TokenFile != "" {
		raw, err := os.ReadFile(c.Admin.TokenFile)
		if err != nil {
			return c, fmt.Errorf("config: admin.token_file: %w", err)
		}
		c.Admin.Token = strings.TrimSpace(string(raw))
	}
	if err := c.loadUpstreams(getenv); err != nil {
		return c, err
	}
	if c.Upstream.APIKey == "" && c.Upstream.APIKeyFile != "" {
		raw, err := os.ReadFile(c.Upstream.APIKeyFile)
		if err != nil {
			return c, fmt.Errorf("config: upstream.api_key_file: %w", err)
		}
		c.Upstream.APIKey = strings.TrimSpace(string(raw))
	}
	c.loadClusterEnv(getenv)
	return c, c.Validate()
}

// Validate checks the configuration and says which key is wrong.
func (c Config) Validate() error {
	var errs []error
	if c.Addr == "" {
		errs = append(errs, errors.New("addr (MIRROR_ADDR) is empty"))
	}
	u, err := url.Parse(c.Upstream.URL)
	switch {
	case err != nil:
		errs = append(errs, errors.New("upstream.url (MIRROR_UPSTREAM) is not a URL"))
	// The messages name scheme and host only: user info or a query could
	// hold a key.
	case u.Scheme != "https" && u.Scheme != "http":
		errs = append(errs, fmt.Errorf("upstream.url (MIRROR_UPSTREAM): scheme %q must be https (or http for tests)", u.Scheme))
	case u.User != nil:
		errs = append(errs, fmt.Errorf("upstream.url (MIRROR_UPSTREAM) for host %q: put credentials in api_key / NGC_API_KEY, not the URL", u.Host))
	case u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "":
		errs = append(errs, fmt.Errorf("upstream.url (MIRROR_UPSTREAM) for host %q: want scheme://host[:port] only, no path or query", u.Host))
	}
	switch c.Storage.Driver {
	case "filesystem":
	case "s3":
		if c.Storage.S3.Bucket == "" || c.Storage.S3.Region == "" {
			errs = append(errs, errors.New("storage.s3.bucket and storage.s3.region are required with storage.driver s3"))
		}
		if e := c.Storage.S3.Endpoint; e != "" {
			if u, err := url.Parse(e); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
				errs = append(errs, errors.New("storage.s3.endpoint: want http(s)://host[:port]"))
			}
		}
		if cs := c.Storage.S3.ChunkSize; cs != 0 && cs < 5<<20 {
			errs = append(errs, errors.New("storage.s3.chunk_size: at least 5 MiB (5242880)"))
		}
	default:
		errs = append(errs, fmt.Errorf("storage.driver %q: want filesystem or s3", c.Storage.Driver))
	}
	if c.Storage.DataDir == "" {
		errs = append(errs, errors.New("storage.data_dir (MIRROR_DATA_DIR) is empty"))
	}
	if _, err := c.Level(); err != nil {
		errs = append(errs, err)
	}
	if c.Upstream.Timeout <= 0 {
		errs = append(errs, errors.New("upstream.timeout must be positive"))
	}
	if c.Upstream.BlobIdleTimeout <= 0 {
		errs = append(errs, errors.New("upstream.blob_idle_timeout must be positive"))
	}
	switch c.Access.Mode {
	case "none", "passthrough":
	case "htpasswd", "token":
		if c.Access.HtpasswdFile == "" {
			errs = append(errs, fmt.Errorf("access.htpasswd_file is required with access.mode %s", c.Access.Mode))
		}
	default:
		errs = append(errs, fmt.Errorf("access.mode %q: want none, htpasswd, token or passthrough", c.Access.Mode))
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		errs = append(errs, errors.New("tls.cert_file and tls.key_file go together"))
	}
	for _, a := range c.Upstream.NSAliases {
		if !nsAlias.MatchString(a) {
			errs = append(errs, fmt.Errorf("upstream.ns_aliases (MIRROR_NS_ALIASES) %q: want a registry host as containerd sends it in ?ns= (nvcr.io, registry.lab:5000), without scheme, path or spaces", a))
		}
	}
	if _, err := clientip.ParseTrusted(c.Server.TrustedProxies); err != nil {
		errs = append(errs, fmt.Errorf("server.trusted_proxies (MIRROR_TRUSTED_PROXIES): %w", err))
	}
	if c.Upstream.MaxFills < 0 {
		errs = append(errs, errors.New("upstream.max_fills must not be negative"))
	}
	if c.Limits.MaxFills < 0 || c.Limits.RequestsPerSecond < 0 || c.Limits.ShutdownGrace < 0 {
		errs = append(errs, errors.New("limits.max_fills, limits.requests_per_second and limits.shutdown_grace must not be negative"))
	}
	if c.Cache.GCGrace < 0 {
		errs = append(errs, errors.New("cache.gc_grace must not be negative"))
	}
	if c.Cache.TagFreshness < 0 {
		errs = append(errs, errors.New("cache.tag_freshness must not be negative"))
	}
	if c.Cache.MaxSize < 0 || c.Cache.MinFree.Bytes < 0 {
		errs = append(errs, errors.New("cache.max_size and cache.min_free must not be negative"))
	}
	if !c.Cache.MinFree.IsZero() && c.Storage.Driver != "filesystem" {
		errs = append(errs, errors.New("cache.min_free (MIRROR_CACHE_MIN_FREE) applies to the filesystem driver only; use cache.max_size with s3"))
	}
	if c.Cache.EvictInterval <= 0 {
		errs = append(errs, errors.New("cache.evict_interval must be positive"))
	}
	errs = append(errs, c.validateUpstreams()...)
	errs = append(errs, c.validateNames()...)
	for _, p := range c.Cache.Pin {
		if _, err := names.ParseImage(p, c.UpstreamHosts(), c.UpstreamNames()...); err != nil {
			errs = append(errs, fmt.Errorf("cache.pin %q: want [REGISTRY/]repository:tag or [REGISTRY/]repository@sha256:..., REGISTRY nvcr.io or a key of upstreams (%v)", p, err))
		}
	}
	errs = append(errs, c.validateTracking()...)
	errs = append(errs, c.validateCluster()...)
	if len(errs) > 0 {
		return fmt.Errorf("config: %w", errors.Join(errs...))
	}
	return nil
}

// nsAlias is a value of containerd's ?ns= query: a registry host, with a
// port when it has one.
var nsAlias = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]{1,5})?$`)

// splitList splits a comma-separated environment value, dropping empty
// entries and the spaces around each.
func splitList(v string) []string {
	var out []string
	for _, a := range strings.Split(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

// Level returns the slog level named by LogLevel.
func (c Config) Level() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return 0, fmt.Errorf("log_level (MIRROR_LOG_LEVEL) %q: want debug, info, warn or error", c.LogLevel)
	}
	return l, nil
}

// UpstreamURL returns the parsed upstream URL (valid after Validate).
func (c Config) UpstreamURL() *url.URL {
	u, _ := url.Parse(strings.TrimSuffix(c.Upstream.URL, "/"))
	return u
}

// UpstreamHosts returns the registry hosts an image name may start with
// (cache.pin, the admin API's "image"): nvcr.io, the upstream's host and
// upstream.ns_aliases. Valid after Validate.
func (c Config) UpstreamHosts() []string {
	hosts := []string{"nvcr.io"}
	if u, err := url.Parse(strings.TrimSuffix(c.Upstream.URL, "/")); err == nil && u.Host != "" {
		hosts = append(hosts, u.Host)
	}
	return append(hosts, c.Upstream.NSAliases...)
}
