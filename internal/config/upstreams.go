package config

import (
	"fmt"
	"net/url"
	"os"
	"path"
	"regexp"
	"slices"
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
	// MaxFills bounds this upstream's blob downloads at once, beside
	// limits.max_fills (0: that bound only), so that its slow misses
	// cannot take every download slot from the other upstreams.
	MaxFills int `yaml:"max_fills"`
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
		if u.MaxFills < 0 {
			errs = append(errs, fmt.Errorf("%s.max_fills must not be negative", key))
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

// canonicalNames writes the repositories (and patterns) of access rules,
// access.public_namespaces, tracking.repositories and prefetch rules as the
// mirror names them (names.QualifiedName): the default upstream's bare,
// without a registry name of it in front (nvcr.io/nvidia/pytorch,
// NVCR.IO/..., the upstream's host or an ns alias: nvidia/pytorch), which
// is unambiguous since no further upstream may be named so; and, for
// names that are not patterns, docker.io's official images with library/
// (docker.io/python is docker.io/library/python). An access rule written
// with nvcr.io/ in front would otherwise never match. cache.pin is read
// by names.ParseImage, which does the same.
func (c *Config) canonicalNames() {
	n := c.nameRules()
	n.canon(c.Tracking.Repositories, true)
	for i := range c.Prefetch.Rules {
		n.canon(c.Prefetch.Rules[i].Repositories, true)
	}
	for i := range c.Access.Rules {
		n.canon(c.Access.Rules[i].Repositories, true)
	}
	n.canon(c.Access.PublicNamespaces, false) // namespaces: docker.io/library as written
}

// validateNames checks that the repositories (and patterns) that access
// rules, access.public_namespaces, tracking.repositories and prefetch
// rules name are of a configured upstream: a first component that looks
// like a registry must be a key of upstreams (the default upstream's
// names are read without theirs: canonicalNames). The default's registry
// name alone (nvcr.io) is refused: it has no bare form, and would stand
// for every repository of nvcr.io, the private org's included.
func (c Config) validateNames() []error {
	n := c.nameRules()
	errs := n.checkPolled("tracking.repositories", c.Tracking.Repositories)
	for i, r := range c.Prefetch.Rules {
		errs = append(errs, n.checkPolled(fmt.Sprintf("prefetch.rules[%d].repositories", i), r.Repositories)...)
	}
	for i, r := range c.Access.Rules {
		errs = append(errs, n.check(fmt.Sprintf("access.rules[%d].repositories", i), r.Repositories)...)
	}
	return append(errs, n.check("access.public_namespaces", c.Access.PublicNamespaces)...)
}

// RuleRepositories does for the repositories of a prefetch rule given
// elsewhere (the admin API's spec) what Load does for prefetch.rules:
// repos are rewritten in place as the mirror names them (canonicalNames),
// and a name of a registry that is not configured is an error worded as
// Load's, with key in front. defaultHosts are the default upstream's
// registry names (Config.UpstreamHosts); upstreams the keys of upstreams
// (Config.UpstreamNames).
func RuleRepositories(key string, repos, defaultHosts, upstreams []string) []error {
	n := nameRules{defaults: defaultHosts, upstreams: upstreams}
	n.canon(repos, true)
	return n.checkPolled(key, repos)
}

// nameRules reads repository names of the config against the registries
// it pulls from.
type nameRules struct {
	defaults  []string // the default upstream's registry names (nvcr.io, its host, ns aliases)
	upstreams []string // the keys of upstreams
}

func (c Config) nameRules() nameRules {
	return nameRules{defaults: c.UpstreamHosts(), upstreams: c.UpstreamNames()}
}

// isDefault reports whether s is a registry name of the default upstream,
// in any case.
func (n nameRules) isDefault(s string) bool {
	return slices.ContainsFunc(n.defaults, func(h string) bool { return strings.EqualFold(s, h) })
}

// canon rewrites list in place: without a default registry name in front
// and, when official, docker.io's one-component names (not patterns) with
// library/.
func (n nameRules) canon(list []string, official bool) {
	for i, name := range list {
		// Not before a wildcard component: nvcr.io/** has no bare form
		// (** matches every upstream's names); check refuses it.
		// Nor before another registry's name (nvcr.io/docker.io would
		// become all of Docker Hub).
		if first, rest, ok := strings.Cut(name, "/"); ok && rest != "" && n.isDefault(first) && !wildFirst(rest) && !registryFirst(rest) {
			name = rest
		}
		if reg, p, ok := strings.Cut(name, "/"); official && ok && reg == names.DockerHub && !strings.ContainsAny(p, "*?[") {
			name = names.QualifiedName(reg, p)
		}
		list[i] = name
	}
}

// wildFirst reports whether the first component of name has a glob
// character.
func wildFirst(name string) bool {
	first, _, _ := strings.Cut(name, "/")
	return strings.ContainsAny(first, "*?[")
}

// registryFirst reports whether the first component of name looks like a
// registry name.
func registryFirst(name string) bool {
	first, _, _ := strings.Cut(name, "/")
	return names.LooksLikeRegistry(first)
}

// check returns an error, keyed key, for each name of list that is the
// default's registry name alone or names a registry not in upstreams.
func (n nameRules) check(key string, list []string) []error {
	var errs []error
	for _, name := range list {
		first, _, _ := strings.Cut(name, "/")
		switch {
		case n.isDefault(strings.TrimSuffix(name, "/")):
			errs = append(errs, fmt.Errorf("%s: %q is the default upstream's registry name alone; name its repositories or namespaces without it (nvidia, nvidia/pytorch, myorg/**)", key, name))
		case n.isDefault(first):
			// Left by canon: a wildcard or a registry name right after it.
			errs = append(errs, fmt.Errorf("%s: %q: the default upstream's names are written without its registry name (or with it once), and a pattern of them must start with a namespace (nvidia/**, myorg/**): a bare ** or * would match every upstream's names, and a registry name after it another upstream's", key, name))
		case !names.LooksLikeRegistry(first) || !strings.Contains(name, "/"):
			// nvcr.io's, or a further upstream's name alone (docker.io
			// as a public namespace opens all of it)
		case !slices.Contains(n.upstreams, first):
			errs = append(errs, fmt.Errorf("%s: %q names the registry %q, which is not a key of upstreams (nvcr.io repositories are written without it or with nvcr.io/: nvidia/pytorch)", key, name, first))
		}
	}
	return errs
}

// checkPolled is check for the repositories whose tags the mirror polls
// (tracking.repositories, prefetch rules): there a registry's name alone
// (ghcr.io) is no repository, as in the registry API; it was polled as the
// default upstream's repository "ghcr.io". Only as a public namespace does
// it stand for the registry's names.
func (n nameRules) checkPolled(key string, list []string) []error {
	errs := n.check(key, list)
	for _, name := range list {
		if !strings.Contains(name, "/") && names.LooksLikeRegistry(name) && !n.isDefault(name) {
			errs = append(errs, fmt.Errorf("%s: %q is a registry's name, not a repository: name its repositories (%s/org/img) or a pattern of them (%s/org/*)", key, name, name, name))
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
