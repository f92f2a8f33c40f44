package config

import (
	"fmt"
	"net/url"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// ExtraUpstream is a further registry the mirror pulls through from,
// beside the default upstream (nvcr.io). It is keyed in Config.Upstreams by
// its registry name: the host clients name it by (docker.io, ghcr.io,
// registry.k8s.io, quay.io), which is also what containerd sends as ?ns=
// and what a client puts in front of a name (mirror.lab/docker.io/...).
type ExtraUpstream struct {
	// URL is scheme://host[:port] of its registry API
	// (https://registry-1.docker.io for docker.io).
	URL string `yaml:"url"`
	// Username and Password (or token) for the upstream; both empty:
	// anonymous. Password is a secret: prefer PasswordFile or the
	// environment (MIRROR_UPSTREAMS_<NAME>_PASSWORD, see PasswordEnv).
	Username     string `yaml:"username"`
	Password     string `yaml:"password"`
	PasswordFile string `yaml:"password_file"`
	// TagFreshness overrides cache.tag_freshness for this upstream (0:
	// cache.tag_freshness).
	TagFreshness Duration `yaml:"tag_freshness"`
	// Repositories, when not empty, is the allow-list of repository paths
	// on this registry (patterns with * and **, as in access rules, without
	// the registry name: library/*). Others are answered 404 NAME_UNKNOWN
	// without an upstream request.
	Repositories []string `yaml:"repositories"`
	// RootHosts are host names (the Host header without its port) under
	// which this upstream's names are served at the root, /v2/<name>/...:
	// what Docker's registry-mirrors needs for docker.io, which sends
	// Docker Hub names without a prefix. A DNS alias of the mirror.
	RootHosts []string `yaml:"root_hosts"`
}

// PasswordEnv is the environment variable that overrides the password of
// the upstream named registry: MIRROR_UPSTREAMS_ + the name in upper case
// with '.' and '-' as '_' + _PASSWORD (docker.io:
// MIRROR_UPSTREAMS_DOCKER_IO_PASSWORD).
func PasswordEnv(registry string) string {
	return "MIRROR_UPSTREAMS_" + strings.NewReplacer(".", "_", "-", "_").Replace(strings.ToUpper(registry)) + "_PASSWORD"
}

// registryName is a registry name of Config.Upstreams: a lower-case DNS
// name with at least one dot and no port (Docker's rule for a first
// component that names a registry is a '.' or ':' in it, or "localhost";
// a port cannot be part of a repository path, so a name with one could
// not be used as a path prefix).
var registryName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$`)

// loadUpstreams applies the environment and password files to the
// further upstreams.
func (c *Config) loadUpstreams(getenv func(string) string) error {
	for name, u := range c.Upstreams {
		if v := getenv(PasswordEnv(name)); v != "" {
			u.Password = v
		}
		if u.Password == "" && u.PasswordFile != "" {
			raw, err := os.ReadFile(u.PasswordFile)
			if err != nil {
				return fmt.Errorf("config: upstreams.%s.password_file: %w", name, err)
			}
			u.Password = strings.TrimSpace(string(raw))
		}
		c.Upstreams[name] = u
	}
	c.canonicalNames()
	return nil
}

// validateUpstreams checks Config.Upstreams. No message holds a password
// or a URL's user info.
func (c Config) validateUpstreams() []error {
	var errs []error
	defaults := map[string]bool{}
	for _, h := range c.UpstreamHosts() {
		defaults[strings.ToLower(h)] = true
		if hn, _, ok := strings.Cut(h, ":"); ok {
			defaults[strings.ToLower(hn)] = true
		}
	}
	roots := map[string]string{}
	for _, name := range c.UpstreamNames() {
		u := c.Upstreams[name]
		key := "upstreams." + name
		switch {
		case !registryName.MatchString(name):
			errs = append(errs, fmt.Errorf("%s: the key is a registry name, a lower-case host name with a dot and no port or scheme (docker.io, ghcr.io)", key))
		case defaults[name]:
			errs = append(errs, fmt.Errorf("%s: %s is the default upstream (upstream.url, nvcr.io, upstream.ns_aliases); configure it under upstream", key, name))
		}
		pu, err := url.Parse(u.URL)
		switch {
		case u.URL == "":
			errs = append(errs, fmt.Errorf("%s.url is required (scheme://host[:port], e.g. https://registry-1.docker.io for docker.io)", key))
		case err != nil:
			errs = append(errs, fmt.Errorf("%s.url is not a URL", key))
		case pu.Scheme != "https" && pu.Scheme != "http":
			errs = append(errs, fmt.Errorf("%s.url: scheme %q must be https (or http for tests)", key, pu.Scheme))
		case pu.User != nil:
			errs = append(errs, fmt.Errorf("%s.url for host %q: put credentials in username and password, not the URL", key, pu.Host))
		case pu.Host == "" || (pu.Path != "" && pu.Path != "/") || pu.RawQuery != "" || pu.Fragment != "" || pu.Opaque != "":
			errs = append(errs, fmt.Errorf("%s.url for host %q: want scheme://host[:port] only, no path or query", key, pu.Host))
		}
		if u.Password != "" && u.Username == "" {
			errs = append(errs, fmt.Errorf("%s: a password needs a username (any name for a token, as the registry documents)", key))
		}
		if u.TagFreshness < 0 {
			errs = append(errs, fmt.Errorf("%s.tag_freshness must not be negative", key))
		}
		for _, p := range u.Repositories {
			if _, err := path.Match(strings.ReplaceAll(p, "**", "*"), "x"); err != nil || p == "" || strings.HasPrefix(p, name+"/") {
				errs = append(errs, fmt.Errorf("%s.repositories: bad pattern %q (repository paths on the registry without its name, with * and **: library/*)", key, p))
			}
		}
		for _, h := range u.RootHosts {
			h = strings.ToLower(h)
			if !registryName.MatchString(h) && h != "localhost" {
				errs = append(errs, fmt.Errorf("%s.root_hosts: %q is not a host name (no scheme or port)", key, h))
			}
			if other, dup := roots[h]; dup {
				errs = append(errs, fmt.Errorf("%s.root_hosts: %q is a root host of upstreams.%s too", key, h, other))
			}
			roots[h] = name
		}
	}
	return errs
}

// canonicalNames writes docker.io's official images in tracking.repositories
// and prefetch rules as the mirror names them: docker.io/python is
// docker.io/library/python (names.QualifiedName). Patterns are left as
// written.
func (c *Config) canonicalNames() {
	canon := func(list []string) {
		for i, n := range list {
			if reg, p, ok := strings.Cut(n, "/"); ok && reg == names.DockerHub && !strings.ContainsAny(p, "*?[") {
				list[i] = names.QualifiedName(reg, p)
			}
		}
	}
	canon(c.Tracking.Repositories)
	for i := range c.Prefetch.Rules {
		canon(c.Prefetch.Rules[i].Repositories)
	}
}

// validateNames checks that the repositories (and patterns) that
// tracking.repositories and prefetch rules name are of a configured
// upstream: a first component that looks like a registry must be a key of
// upstreams (nvcr.io's repositories are written without a registry).
func (c Config) validateNames() []error {
	var errs []error
	check := func(key, name string) {
		first, _, ok := strings.Cut(name, "/")
		if !ok || !(strings.ContainsAny(first, ".:") || first == "localhost") {
			return
		}
		if _, known := c.Upstreams[first]; !known {
			errs = append(errs, fmt.Errorf("%s: %q names the registry %q, which is not a key of upstreams (nvcr.io repositories are written without it: nvidia/pytorch)", key, name, first))
		}
	}
	for _, r := range c.Tracking.Repositories {
		check("tracking.repositories", r)
	}
	for i, r := range c.Prefetch.Rules {
		for _, p := range r.Repositories {
			check(fmt.Sprintf("prefetch.rules[%d].repositories", i), p)
		}
	}
	return errs
}

// UpstreamNames returns the registry names of Config.Upstreams, sorted.
func (c Config) UpstreamNames() []string {
	out := make([]string, 0, len(c.Upstreams))
	for n := range c.Upstreams {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// ExtraUpstreamURL returns the parsed URL of upstream name (valid after
// Validate).
func (c Config) ExtraUpstreamURL(name string) *url.URL {
	u, _ := url.Parse(strings.TrimSuffix(c.Upstreams[name].URL, "/"))
	return u
}
