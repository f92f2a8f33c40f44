package config

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// envOf returns a getenv func over m.
func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func noEnv(string) string { return "" }

// writeFile writes content to a new file in a temporary directory.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	want := Config{
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
			Mode:             "none",
			PublicNamespaces: []string{"nvidia"},
			TokenLifetime:    Duration(15 * time.Minute),
			PassthroughTTL:   Duration(time.Minute),
		},
		State:    State{Timeout: Duration(time.Second)},
		Tracking: Tracking{Poll: "@every 1h", Recent: Duration(30 * 24 * time.Hour)},
		Prefetch: Prefetch{Enabled: true, MaxJobs: 2, Auto: AutoPrefetch{Enabled: true, Window: Duration(14 * 24 * time.Hour)}},
		Cluster:  Cluster{Listen: ":5002", Heartbeat: Duration(2 * time.Second)},
	}
	if got := Default(); !reflect.DeepEqual(got, want) {
		t.Fatalf("Default() = %+v\nwant %+v", got, want)
	}
	got, err := Load("", noEnv)
	if err != nil {
		t.Fatalf("Load with no file and no env: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Load(\"\") = %+v\nwant %+v", got, want)
	}
	if err := Default().Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if l, err := got.Level(); err != nil || l != slog.LevelInfo {
		t.Fatalf("Level() = %v, %v", l, err)
	}
	u := got.UpstreamURL()
	if u.Scheme != "https" || u.Host != "nvcr.io" || u.Path != "" {
		t.Fatalf("UpstreamURL() = %v", u)
	}
}

func TestFileOverridesDefaults(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", `
# a comment
addr: 127.0.0.1:6000
log_level: debug
upstream:
  url: http://127.0.0.1:8443/
  ns_aliases: [nvcr.io, registry.example]
  timeout: 45s
storage:
  data_dir: /var/lib/mirror
cache:
  tag_freshness: 0s
  spool_dir: /tmp/spool
`)
	got, err := Load(p, noEnv)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := Default()
	want.Addr = "127.0.0.1:6000"
	want.LogLevel = "debug"
	want.Upstream.URL = "http://127.0.0.1:8443/"
	want.Upstream.NSAliases = []string{"nvcr.io", "registry.example"}
	want.Upstream.Timeout = Duration(45 * time.Second)
	want.Storage.DataDir = "/var/lib/mirror"
	want.Cache.TagFreshness = 0
	want.Cache.SpoolDir = "/tmp/spool"
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Load = %+v\nwant %+v", got, want)
	}
	// Keys the file did not mention keep their defaults.
	if got.Upstream.Username != "$oauthtoken" || got.Upstream.BlobIdleTimeout != Duration(time.Minute) || got.Storage.Driver != "filesystem" {
		t.Errorf("unmentioned keys lost their defaults: %+v", got)
	}
	if l, _ := got.Level(); l != slog.LevelDebug {
		t.Errorf("Level() = %v, want debug", l)
	}
	if u := got.UpstreamURL(); u.String() != "http://127.0.0.1:8443" {
		t.Errorf("UpstreamURL() = %v, want the trailing slash trimmed", u)
	}
}

func TestEnvOverridesFile(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", `
addr: ":6000"
log_level: debug
upstream:
  url: https://file.example
  username: file-user
  api_key: file-key
storage:
  data_dir: /file/data
`)
	env := map[string]string{
		"MIRROR_ADDR":              ":7000",
		"MIRROR_UPSTREAM":          "https://env.example:8443",
		"NGC_API_KEY":              "env-key",
		"MIRROR_UPSTREAM_USERNAME": "env-user",
		"MIRROR_DATA_DIR":          "/env/data",
		"MIRROR_LOG_LEVEL":         "warn",
	}
	got, err := Load(p, envOf(env))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got.Addr != ":7000" || got.Upstream.URL != "https://env.example:8443" || got.Upstream.APIKey != "env-key" ||
		got.Upstream.Username != "env-user" || got.Storage.DataDir != "/env/data" || got.LogLevel != "warn" {
		t.Fatalf("environment did not override the file: %+v", got)
	}

	// Empty variables override nothing; unset ones neither.
	got, err = Load(p, envOf(map[string]string{"MIRROR_ADDR": "", "MIRROR_LOG_LEVEL": "error"}))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got.Addr != ":6000" || got.Upstream.APIKey != "file-key" || got.LogLevel != "error" || got.Upstream.URL != "https://file.example" {
		t.Fatalf("got %+v", got)
	}

	// Env over defaults with no file.
	got, err = Load("", envOf(map[string]string{"NGC_API_KEY": "k", "MIRROR_ADDR": ":9"}))
	if err != nil || got.Upstream.APIKey != "k" || got.Addr != ":9" || got.Upstream.URL != "https://nvcr.io" {
		t.Fatalf("Load(\"\", env) = %+v, %v", got, err)
	}
}

func TestUnknownKeysAreErrors(t *testing.T) {
	t.Parallel()
	for _, content := range []string{
		"adress: :5000\n",
		"upstream:\n  urll: https://nvcr.io\n",
		"cache:\n  tag_freshnes: 1m\n",
		"storage:\n  driver: filesystem\n  bucket: x\n",
	} {
		p := writeFile(t, "mirror.yaml", content)
		if c, err := Load(p, noEnv); err == nil {
			t.Errorf("Load accepted unknown key in %q: %+v", content, c)
		} else if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not name the file", err)
		}
	}
}

func TestAPIKeyFile(t *testing.T) {
	t.Parallel()
	keyFile := writeFile(t, "ngc.key", "  \tnvapi-from-file-123\r\n\n")
	p := writeFile(t, "mirror.yaml", "upstream:\n  api_key_file: "+keyFile+"\n")

	got, err := Load(p, noEnv)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got.Upstream.APIKey != "nvapi-from-file-123" {
		t.Fatalf("APIKey = %q, want the trimmed file content", got.Upstream.APIKey)
	}

	// NGC_API_KEY wins over the file, which is then not needed at all.
	missing := filepath.Join(t.TempDir(), "absent.key")
	p2 := writeFile(t, "mirror.yaml", "upstream:\n  api_key_file: "+missing+"\n")
	got, err = Load(p2, envOf(map[string]string{"NGC_API_KEY": "env-key"}))
	if err != nil || got.Upstream.APIKey != "env-key" {
		t.Fatalf("Load with NGC_API_KEY and a missing key file = %q, %v", got.Upstream.APIKey, err)
	}

	// Without NGC_API_KEY, a missing key file is an error naming the key.
	_, err = Load(p2, noEnv)
	if err == nil || !strings.Contains(err.Error(), "upstream.api_key_file") {
		t.Fatalf("Load with a missing key file: %v, want an error naming upstream.api_key_file", err)
	}
}

func TestInvalidValuesNameTheKey(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		yaml    string
		env     map[string]string
		wantKey string
	}{
		{"ftp upstream", "upstream:\n  url: ftp://nvcr.io\n", nil, "upstream.url"},
		{"schemeless upstream", "upstream:\n  url: nvcr.io\n", nil, "upstream.url"},
		{"upstream with path", "upstream:\n  url: https://nvcr.io/v2/\n", nil, "upstream.url"},
		{"upstream with query", "upstream:\n  url: https://nvcr.io?x=1\n", nil, "upstream.url"},
		{"upstream without host", "upstream:\n  url: https://\n", nil, "upstream.url"},
		{"unparseable upstream", "upstream:\n  url: \"https://nvcr.io:port\"\n", nil, "upstream.url"},
		{"bad upstream from env", "", map[string]string{"MIRROR_UPSTREAM": "nvcr.io"}, "MIRROR_UPSTREAM"},
		{"bad log level", "log_level: verbose\n", nil, "log_level"},
		{"bad log level from env", "", map[string]string{"MIRROR_LOG_LEVEL": "loud"}, "MIRROR_LOG_LEVEL"},
		{"empty addr", "addr: \"\"\n", nil, "addr"},
		{"empty data dir", "storage:\n  data_dir: \"\"\n", nil, "storage.data_dir"},
		{"other driver", "storage:\n  driver: s3-aws\n", nil, "storage.driver"},
		{"zero timeout", "upstream:\n  timeout: 0s\n", nil, "upstream.timeout"},
		{"negative idle timeout", "upstream:\n  blob_idle_timeout: -1s\n", nil, "upstream.blob_idle_timeout"},
		{"negative freshness", "cache:\n  tag_freshness: -1m\n", nil, "cache.tag_freshness"},
		{"duration without unit", "upstream:\n  timeout: 30\n", nil, "30"},
		{"duration in words", "cache:\n  tag_freshness: five minutes\n", nil, "five minutes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := ""
			if tc.yaml != "" {
				p = writeFile(t, "mirror.yaml", tc.yaml)
			}
			_, err := Load(p, envOf(tc.env))
			if err == nil {
				t.Fatalf("Load accepted %q / %v", tc.yaml, tc.env)
			}
			if !strings.Contains(err.Error(), tc.wantKey) {
				t.Fatalf("error %q does not name %q", err, tc.wantKey)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	t.Parallel()
	c := Default()
	c.Upstream.URL = "ftp://x"
	c.LogLevel = "chatty"
	c.Storage.DataDir = ""
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted a config with three errors")
	}
	for _, key := range []string{"upstream.url", "log_level", "storage.data_dir"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error %q does not mention %s", err, key)
		}
	}
}

func TestLogLevels(t *testing.T) {
	t.Parallel()
	for name, want := range map[string]slog.Level{
		"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError,
		"DEBUG": slog.LevelDebug, "Warn": slog.LevelWarn,
	} {
		c := Default()
		c.LogLevel = name
		if l, err := c.Level(); err != nil || l != want {
			t.Errorf("Level(%q) = %v, %v; want %v", name, l, err, want)
		}
		if err := c.Validate(); err != nil {
			t.Errorf("Validate with log level %q: %v", name, err)
		}
	}
}

func TestEmptyFileIsFine(t *testing.T) {
	t.Parallel()
	for _, content := range []string{"", "\n\n", "# only a comment\n", "---\n"} {
		p := writeFile(t, "mirror.yaml", content)
		got, err := Load(p, noEnv)
		if err != nil {
			t.Errorf("Load(%q): %v", content, err)
			continue
		}
		if !reflect.DeepEqual(got, Default()) {
			t.Errorf("Load(%q) = %+v, want the defaults", content, got)
		}
	}
}

func TestMissingFileIsAnError(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "nope.yaml")
	if _, err := Load(p, noEnv); err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("Load of a missing file: %v", err)
	}
}

func TestPrefetchRulesFromYAML(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", `
state:
  redis_url: redis://127.0.0.1:6379/0
tracking:
  repositories: [nvidia/pytorch]
  poll: "*/30 * * * *"
prefetch:
  auto: {enabled: false}
  rules:
    - name: frameworks
      repositories: [nvidia/pytorch, "nvidia/**"]
      tags: {latest: 2, regex: '24\.\d\d-py3', exact: [24.05-py3]}
      variants: [py3, py3-igpu]
      platforms: [linux/amd64]
      schedule: "0 3 * * *"
      concurrency: 8
      bandwidth: 100MiB
      pin: true
admin:
  token: s3cret
`)
	c, err := Load(p, func(k string) string {
		if k == "MIRROR_REDIS_URL" {
			return "redis://10.0.0.1:6379/1"
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	r := c.Prefetch.Rules[0]
	if c.State.RedisURL != "redis://10.0.0.1:6379/1" || c.Prefetch.Auto.Enabled || !c.Prefetch.Enabled ||
		r.Bandwidth != 100<<20 || r.Tags.Latest != 2 || r.Tags.Regex != `24\.\d\d-py3` || !r.Pin || r.Concurrency != 8 ||
		len(r.Platforms) != 1 || c.Admin.Token != "s3cret" || c.Tracking.Poll != "*/30 * * * *" {
		t.Errorf("parsed %+v / %+v", c, r)
	}
	dup := writeFile(t, "dup.yaml", "prefetch:\n  rules:\n    - {name: a}\n    - {name: a}\n")
	if _, err := Load(dup, noEnv); err == nil || !strings.Contains(err.Error(), "duplicate name") {
		t.Errorf("duplicate rule names: %v", err)
	}
}

// configs/mirror.yaml documents every key with its default: loading it
// gives exactly the defaults.
func TestShippedConfigIsTheDefaults(t *testing.T) {
	t.Parallel()
	got, err := Load("../../configs/mirror.yaml", noEnv)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	// YAML's empty lists decode to empty slices, the defaults have nil.
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("configs/mirror.yaml = %+v\ndefaults           %+v", got, want)
	}
}

// TestConfigErrorsNameTheKey: a typo or a wrong value names the key path
// and the line, and says what to write, never a Go type.
func TestConfigErrorsNameTheKey(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ content, want string }{
		{"cache:\n  max_szie: 10GiB\n", "line 2: unknown key cache.max_szie (configs/mirror.yaml lists every key)"},
		{"adress: :5000\n", "line 1: unknown key adress"},
		{"access:\n  rules:\n    - repositories: [a/*]\n      user: [alice]\n", "line 4: unknown key access.rules[0].user"},
		{"prefetch:\n  rules:\n    - name: x\n      tags: {lates: 2}\n", "unknown key prefetch.rules[0].tags.lates"},
		{"limits:\n  max_fills: many\n", `line 2: limits.max_fills: want a whole number, got "many"`},
		// yaml.v3 would truncate these (0.5 rps turned the limit off).
		{"limits:\n  requests_per_second: 0.5\n", `line 2: limits.requests_per_second: want a whole number, got 0.5`},
		{"limits:\n  max_fills: 1.5\n", `line 2: limits.max_fills: want a whole number, got 1.5`},
		{"upstreams:\n  docker.io:\n    url: https://registry-1.docker.io\n    max_fills: 2.25\n", `line 4: upstreams.docker.io.max_fills: want a whole number, got 2.25`},
		{"prefetch:\n  rules:\n    - name: x\n      tags: {latest: 1.5}\n", `line 4: prefetch.rules[0].tags.latest: want a whole number, got 1.5`},
		{"storage:\n  s3:\n    redirect: sometimes\n", `line 3: storage.s3.redirect: want true or false, got "sometimes"`},
		{"upstream:\n  timeout: soon\n", `line 2: upstream.timeout: "soon" is not a duration`},
		{"cache:\n  max_size: lots\n", `line 2: cache.max_size: "lots" is not a size`},
		{"tracking:\n  repositories: nvidia/cuda\n", "line 2: tracking.repositories: want a list"},
	} {
		p := writeFile(t, "mirror.yaml", tc.content)
		_, err := Load(p, noEnv)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%q: error %v, want it to name the file and contain %q", tc.content, err, tc.want)
		}
		if err != nil && (strings.Contains(err.Error(), "config.") || strings.Contains(err.Error(), "!!")) {
			t.Errorf("%q: error %v names a Go type or YAML tag", tc.content, err)
		}
	}
}

// MIRROR_NS_ALIASES sets upstream.ns_aliases, comma-separated, replacing
// the file's list.
func TestNSAliasesFromEnv(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", "upstream:\n  ns_aliases: [file.example]\n")
	got, err := Load(p, envOf(map[string]string{"MIRROR_NS_ALIASES": "nvcr.io, nvcr.lab.example ,"}))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"nvcr.io", "nvcr.lab.example"}; !reflect.DeepEqual(got.Upstream.NSAliases, want) {
		t.Errorf("ns_aliases = %q, want %q", got.Upstream.NSAliases, want)
	}
	if got, _ := Load(p, noEnv); !reflect.DeepEqual(got.Upstream.NSAliases, []string{"file.example"}) {
		t.Errorf("without the variable: %q", got.Upstream.NSAliases)
	}
	if got, err := Load("", envOf(map[string]string{"MIRROR_NS_ALIASES": "localhost:5000,Registry.Lab"})); err != nil || len(got.Upstream.NSAliases) != 2 {
		t.Errorf("host:port and upper case: %q, %v", got.Upstream.NSAliases, err)
	}
	// An alias no ?ns= can ever equal is refused, naming it.
	for _, bad := range []string{"https://nvcr.io", "nvcr.io/nvidia", "nvcr io", "nvcr.io:port"} {
		_, err := Load("", envOf(map[string]string{"MIRROR_NS_ALIASES": bad}))
		if err == nil || !strings.Contains(err.Error(), "upstream.ns_aliases (MIRROR_NS_ALIASES)") || !strings.Contains(err.Error(), bad) {
			t.Errorf("MIRROR_NS_ALIASES=%s: %v, want a refusal naming it", bad, err)
		}
	}
}

// server.trusted_proxies takes CIDR prefixes and addresses (the file, or
// MIRROR_TRUSTED_PROXIES comma-separated, which replaces it); anything else
// is refused naming the key and the entry.
func TestTrustedProxies(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", "server:\n  trusted_proxies: [10.0.0.0/8, 192.168.1.5, \"fd00::/8\"]\n")
	got, err := Load(p, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"10.0.0.0/8", "192.168.1.5", "fd00::/8"}; !reflect.DeepEqual(got.Server.TrustedProxies, want) {
		t.Errorf("trusted_proxies = %q, want %q", got.Server.TrustedProxies, want)
	}
	got, err = Load(p, envOf(map[string]string{"MIRROR_TRUSTED_PROXIES": " 127.0.0.1/32,::1 ,"}))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.1/32", "::1"}; !reflect.DeepEqual(got.Server.TrustedProxies, want) {
		t.Errorf("from MIRROR_TRUSTED_PROXIES: %q, want %q", got.Server.TrustedProxies, want)
	}
	for _, bad := range []string{"haproxy", "10.0.0.0/33", "10.0.0.*"} {
		_, err := Load("", envOf(map[string]string{"MIRROR_TRUSTED_PROXIES": bad}))
		if err == nil || !strings.Contains(err.Error(), "server.trusted_proxies (MIRROR_TRUSTED_PROXIES)") || !strings.Contains(err.Error(), bad) {
			t.Errorf("MIRROR_TRUSTED_PROXIES=%s: %v, want a refusal naming the key and the entry", bad, err)
		}
	}
}

// MIRROR_ACCESS_LOG=false turns the access log off (it is on by default
// and in the shipped file).
func TestAccessLogSwitch(t *testing.T) {
	t.Parallel()
	for env, want := range map[string]bool{"": true, "false": false, "0": false, "true": true} {
		got, err := Load("../../configs/mirror.yaml", envOf(map[string]string{"MIRROR_ACCESS_LOG": env}))
		if err != nil || got.AccessLog != want {
			t.Errorf("MIRROR_ACCESS_LOG=%q: access_log %v, %v; want %v", env, got.AccessLog, err, want)
		}
	}
	p := writeFile(t, "mirror.yaml", "access_log: false\n")
	if got, err := Load(p, noEnv); err != nil || got.AccessLog {
		t.Errorf("access_log: false in the file: %v, %v", got.AccessLog, err)
	}
	if _, err := Load("", envOf(map[string]string{"MIRROR_ACCESS_LOG": "off"})); err == nil || !strings.Contains(err.Error(), "MIRROR_ACCESS_LOG") {
		t.Errorf("MIRROR_ACCESS_LOG=off: %v", err)
	}
}

// cache.pin takes the image syntax of the admin API (names.ParseImage):
// with or without the upstream's host in front.
func TestPinSyntax(t *testing.T) {
	t.Parallel()
	d := "@sha256:" + strings.Repeat("a", 64)
	for pin, ok := range map[string]bool{
		"nvidia/pytorch:24.05-py3":             true,
		"nvcr.io/nvidia/pytorch:24.05-py3":     true,
		"127.0.0.1:40123/nvidia/pytorch:17.12": true,
		"nvcr.io/nvidia/cuda" + d:              true,
		"nvidia/cuda:12.4" + d:                 true,
		"docker.io/library/redis:7":            false,
		"nvidia/pytorch":                       false,
		"nvcr.io/nvidia/pytorch":               false,
		"Nvidia/pytorch:1":                     false,
	} {
		c := Default()
		c.Upstream.URL = "http://127.0.0.1:40123"
		c.Cache.Pin = []string{pin}
		if err := c.Validate(); (err == nil) != ok {
			t.Errorf("cache.pin %q: Validate() = %v, want ok %v", pin, err, ok)
		} else if err != nil && !strings.Contains(err.Error(), "cache.pin") {
			t.Errorf("cache.pin %q: error %q does not name the key", pin, err)
		}
	}
}

// A whole number written as a float (2.0, 1e2) is still that number.
func TestWholeFloatIsAnInt(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", "limits:\n  max_fills: 2.0\n  requests_per_second: 1e2\n")
	got, err := Load(p, noEnv)
	if err != nil || got.Limits.MaxFills != 2 || got.Limits.RequestsPerSecond != 100 {
		t.Errorf("max_fills %d, requests_per_second %d, err %v; want 2, 100, nil", got.Limits.MaxFills, got.Limits.RequestsPerSecond, err)
	}
}
