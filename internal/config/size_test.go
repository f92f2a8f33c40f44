package config

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{
		"0": 0, "1048576": 1 << 20, "500GiB": 500 << 30, "2TB": 2e12, "1.5 TiB": 3 << 39,
		"800M": 800e6, "10kib": 10 << 10, " 7 B ": 7, "1.5GB": 1.5e9,
	} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "GiB", "-1GiB", "1 XB", "1e3", "ten", "1..2G", "99999999PiB"} {
		if got, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, got)
		}
	}
	if f, err := ParseFreeSpace("10%"); err != nil || f.Percent != 10 || f.Bytes != 0 {
		t.Errorf("ParseFreeSpace(10%%) = %+v, %v", f, err)
	}
	if f, err := ParseFreeSpace("50GiB"); err != nil || f.Bytes != 50<<30 || f.Percent != 0 {
		t.Errorf("ParseFreeSpace(50GiB) = %+v, %v", f, err)
	}
	for _, in := range []string{"100%", "-5%", "x%", "%"} {
		if f, err := ParseFreeSpace(in); err == nil {
			t.Errorf("ParseFreeSpace(%q) = %+v, want an error", in, f)
		}
	}
}

func TestCacheBudgetKeys(t *testing.T) {
	t.Parallel()
	p := writeFile(t, "mirror.yaml", `
cache:
  max_size: 500GiB
  min_free: 10%
  evict_interval: 30s
  pin: ["nvidia/pytorch:24.05-py3", "nvidia/cuda@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]
`)
	got, err := Load(p, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if got.Cache.MaxSize != 500<<30 || got.Cache.MinFree.Percent != 10 || got.Cache.EvictInterval != Duration(30*time.Second) || len(got.Cache.Pin) != 2 {
		t.Fatalf("cache = %+v", got.Cache)
	}
	got, err = Load(p, envOf(map[string]string{"MIRROR_CACHE_MAX_SIZE": "2TB", "MIRROR_CACHE_MIN_FREE": "20GiB"}))
	if err != nil || got.Cache.MaxSize != 2e12 || got.Cache.MinFree != (FreeSpace{Bytes: 20 << 30}) {
		t.Fatalf("env over file: %+v, %v", got.Cache, err)
	}

	for _, tc := range []struct {
		yaml    string
		env     map[string]string
		wantKey string
	}{
		{"cache:\n  max_size: lots\n", nil, "lots"},
		{"cache:\n  min_free: 150%\n", nil, "150%"},
		{"", map[string]string{"MIRROR_CACHE_MAX_SIZE": "1 XB"}, "MIRROR_CACHE_MAX_SIZE"},
		{"", map[string]string{"MIRROR_CACHE_MIN_FREE": "-3%"}, "MIRROR_CACHE_MIN_FREE"},
		{"cache:\n  evict_interval: 0s\n", nil, "cache.evict_interval"},
		{"cache:\n  pin: [nvidia/pytorch]\n", nil, "cache.pin"},
		{"cache:\n  pin: [\"docker.io/nvidia/pytorch:1\"]\n", nil, "cache.pin"},
		{"cache:\n  pin: [\"Nvidia/pytorch:1\"]\n", nil, "cache.pin"},
		{"storage:\n  driver: s3\n  s3: {bucket: b, region: r}\ncache:\n  min_free: 10GiB\n", nil, "cache.min_free"},
	} {
		p := ""
		if tc.yaml != "" {
			p = writeFile(t, "mirror.yaml", tc.yaml)
		}
		if _, err := Load(p, envOf(tc.env)); err == nil || !strings.Contains(err.Error(), tc.wantKey) {
			t.Errorf("Load(%q, %v) = %v, want an error naming %q", tc.yaml, tc.env, err, tc.wantKey)
		}
	}
}

// The admin API takes a rule's bandwidth as the YAML does (a string with a
// unit) or as a number of bytes; String writes what ParseSize reads back.
func TestSizeJSONAndString(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]Size{`"10MiB"`: 10 << 20, `10485760`: 10 << 20, `"2TB"`: 2e12, `"0"`: 0, `null`: 0} {
		var s Size
		if err := json.Unmarshal([]byte(in), &s); err != nil || s != want {
			t.Errorf("json %s = %d, %v; want %d", in, s, err, want)
		}
	}
	for _, in := range []string{`"ten"`, `-1`, `"-1MiB"`, `true`, `{}`} {
		var s Size
		if err := json.Unmarshal([]byte(in), &s); err == nil {
			t.Errorf("json %s = %d, want an error", in, s)
		}
	}
	var r PrefetchRule
	if err := json.Unmarshal([]byte(`{"name":"x","bandwidth":"200MiB"}`), &r); err != nil || r.Bandwidth != 200<<20 {
		t.Errorf("rule bandwidth = %d, %v", r.Bandwidth, err)
	}
	for n, want := range map[int64]string{0: "0", 50 << 30: "50GiB", 2e12: "2TB", 1500: "1500B", 3 << 39: "1536GiB", 1e6: "1MB"} {
		got := Size(n).String()
		if got != want {
			t.Errorf("Size(%d).String() = %q, want %q", n, got, want)
		}
		if back, err := ParseSize(got); err != nil || back != n {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", got, back, err, n)
		}
	}
	for f, want := range map[FreeSpace]string{{Percent: 10}: "10%", {Percent: 2.5}: "2.5%", {Bytes: 50 << 30}: "50GiB", {}: "0"} {
		if got := f.String(); got != want {
			t.Errorf("%+v.String() = %q, want %q", f, got, want)
		}
	}
}
