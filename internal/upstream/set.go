package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// ErrNameUnknown is returned for a name the mirror has no upstream for: a
// registry that is not configured, or a repository outside an upstream's
// allow-list. No upstream request is made for it (OCI NAME_UNKNOWN, 404).
var ErrNameUnknown = errors.New("upstream: no configured upstream serves this name")

// Registry is one upstream of the mirror, with what is particular to it.
// Each has a Client of its own (over an auth.Transport of its own), so the
// token cache and a 429 back-off of one never hold up another.
type Registry struct {
	// Name is the registry name: the host clients name it by (docker.io,
	// ghcr.io; for the default upstream its URL's host, nvcr.io). It keys
	// the cache's tag records and links (storage.Repo.Registry) and is the
	// metrics' upstream label.
	Name   string
	Client *Client
	// TagFreshness overrides the pull service's tag freshness (0: its
	// default).
	TagFreshness time.Duration
	// Repositories is the allow-list of repository paths (patterns of
	// names.MatchRepository); empty: every repository.
	Repositories []string
	// RootHosts are request host names (no port) under which this
	// upstream's names are served without a registry prefix (Docker's
	// registry-mirrors for docker.io).
	RootHosts []string
}

// Set is the mirror's upstreams: one default (nvcr.io), whose repositories
// are named by their bare paths (nvidia/pytorch), and further ones keyed by
// registry name, whose repositories are named registry/path
// (docker.io/library/ubuntu): the qualified name of names.QualifiedName,
// which everything above the upstream (cache state, pull history, access
// rules, pins, prefetch) uses. Build it with NewSet; it is read-only after.
type Set struct {
	def      *Registry
	defNames map[string]bool      // lower-case names that select the default
	byName   map[string]*Registry // further upstreams
	roots    map[string]*Registry // request host → upstream served at the root
	all      []*Registry
}

// NewSet returns the set of the default upstream def, also selected by
// defaultNames (nvcr.io, upstream.ns_aliases) besides def.Name, and the
// further upstreams. Names are compared without case. It fails on a
// further upstream named like the default or like another, or whose name
// does not look like a registry (names.LooksLikeRegistry).
func NewSet(def *Registry, defaultNames []string, others ...*Registry) (*Set, error) {
	s := &Set{def: def, defNames: map[string]bool{strings.ToLower(def.Name): true},
		byName: map[string]*Registry{}, roots: map[string]*Registry{}, all: []*Registry{def}}
	for _, n := range defaultNames {
		s.defNames[strings.ToLower(n)] = true
	}
	for _, r := range others {
		n := strings.ToLower(r.Name)
		switch {
		case !names.LooksLikeRegistry(n) || strings.ContainsAny(n, ":/"):
			return nil, fmt.Errorf("upstream %q: a registry name is a host name with a dot (docker.io)", r.Name)
		case s.defNames[n]:
			return nil, fmt.Errorf("upstream %q: that name selects the default upstream", r.Name)
		case s.byName[n] != nil:
			return nil, fmt.Errorf("upstream %q: configured twice", r.Name)
		}
		r.Name = n
		s.byName[n] = r
		s.all = append(s.all, r)
		for _, h := range r.RootHosts {
			s.roots[strings.ToLower(h)] = r
		}
	}
	return s, nil
}

// Single is the set of one upstream, the default, named by its client's
// host: the mirror as it was before further upstreams.
func Single(c *Client) *Set {
	s, _ := NewSet(&Registry{Name: strings.ToLower(c.Host()), Client: c}, nil)
	return s
}

// Default returns the default upstream.
func (s *Set) Default() *Registry { return s.def }

// All returns every upstream, the default first.
func (s *Set) All() []*Registry { return s.all }

// Get returns the upstream registry name selects: a further upstream's
// name, or any of the default's names. nil when none does.
func (s *Set) Get(name string) *Registry {
	n := strings.ToLower(name)
	if r := s.byName[n]; r != nil {
		return r
	}
	if s.defNames[n] {
		return s.def
	}
	return nil
}

// Names returns every registry name that selects an upstream: the
// default's (its name first, then its aliases, sorted), then the further
// upstreams' (sorted).
func (s *Set) Names() []string {
	var aliases, others []string
	for n := range s.defNames {
		if n != strings.ToLower(s.def.Name) {
			aliases = append(aliases, n)
		}
	}
	for n := range s.byName {
		others = append(others, n)
	}
	slices.Sort(aliases)
	slices.Sort(others)
	return append(append([]string{strings.ToLower(s.def.Name)}, aliases...), others...)
}

// IsDefault reports whether r is the default upstream.
func (s *Set) IsDefault(r *Registry) bool { return r == s.def }

// Qualify returns the qualified name of path on r (names.QualifiedName):
// path itself on the default upstream.
func (s *Set) Qualify(r *Registry, path string) string {
	if r == s.def {
		return path
	}
	return names.QualifiedName(r.Name, path)
}

// Route resolves the repository name of a registry API request to its
// upstream and qualified name, by these rules in order:
//
//  1. ns (containerd's ?ns=<registry>, hosts.toml) names the upstream; the
//     name is the path on it.
//  2. A name whose first component looks like a registry (a '.' or ':' in
//     it, or "localhost": Docker's rule) is prefixed: that component must
//     be a configured registry name (a further upstream's, or one of the
//     default's), the rest is the path (/v2/docker.io/library/ubuntu/...).
//  3. host (the request's Host; a port is ignored) being a root host of an
//     upstream names that upstream (Docker's registry-mirrors).
//  4. Otherwise the name belongs to the default upstream (nvidia/pytorch).
//
// On docker.io a one-component path gets "library/". A path whose first
// component looks like a registry is never a repository path: with ns, or
// after a prefix, it is refused, and so is such a component alone on the
// default upstream (/v2/ghcr.io/tags/list names no repository; read as the
// default's repository "ghcr.io" it would be fetched with the default's
// credentials under the access policy of the public upstream ghcr.io). On a
// further upstream it is a path like any (registry.lab/my.app: the
// qualified name keeps the registry). Errors wrap ErrNameUnknown (an unknown
// registry, a path outside the upstream's allow-list); nothing is asked of
// an upstream here.
func (s *Set) Route(ns, host, name string) (*Registry, string, error) {
	var r *Registry
	path := name
	first, rest, prefixed := strings.Cut(name, "/")
	prefixed = prefixed && names.LooksLikeRegistry(first)
	switch {
	case ns != "":
		if r = s.Get(ns); r == nil {
			if len(ns) > 100 {
				ns = ns[:100] + "..."
			}
			return nil, "", fmt.Errorf("%w: ns=%q is not a registry this mirror pulls from (ns may be %s)", ErrNameUnknown, ns, strings.Join(s.Names(), ", "))
		}
	case prefixed:
		if r = s.Get(first); r == nil {
			return nil, "", fmt.Errorf("%w: %s is not a registry this mirror pulls from", ErrNameUnknown, first)
		}
		path = rest
	default:
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if r = s.roots[strings.ToLower(host)]; r == nil {
			r = s.def
		}
	}
	switch f, _, ok := strings.Cut(path, "/"); {
	case ok && names.LooksLikeRegistry(f):
		return nil, "", fmt.Errorf("%w: a repository path does not begin with a registry name", ErrNameUnknown)
	case !ok && r == s.def && names.LooksLikeRegistry(f):
		// /v2/ghcr.io/tags/list: the default's qualified name would be
		// "ghcr.io", which the access policy reads as that registry.
		return nil, "", fmt.Errorf("%w: %s names a registry, not a repository", ErrNameUnknown, f)
	}
	q := s.Qualify(r, path)
	if _, _, err := s.Split(q); err != nil {
		return nil, "", err
	}
	return r, q, nil
}

// Split resolves a qualified name to its upstream and the repository path
// on it. Errors wrap ErrNameUnknown: a first component that looks like a
// registry but is no further upstream's name (the default's names are not
// written in qualified names), or a path outside the upstream's
// allow-list.
func (s *Set) Split(qualified string) (*Registry, string, error) {
	reg, path := names.SplitQualified(qualified)
	r := s.def
	if reg != "" {
		if r = s.byName[strings.ToLower(reg)]; r == nil {
			return nil, "", fmt.Errorf("%w: %s is not a registry this mirror pulls from", ErrNameUnknown, reg)
		}
	}
	if len(r.Repositories) > 0 {
		ok := false
		for _, p := range r.Repositories {
			ok = ok || names.MatchRepository(p, path)
		}
		if !ok {
			return nil, "", fmt.Errorf("%w: %s is not among the repositories this mirror serves from %s", ErrNameUnknown, path, r.Name)
		}
	}
	return r, path, nil
}

// ListTags lists tags of the repository with qualified name repo on its
// upstream (Client.ListTags).
func (s *Set) ListTags(ctx context.Context, repo string, n int, last string) (*TagPage, error) {
	r, path, err := s.Split(repo)
	if err != nil {
		return nil, err
	}
	return r.Client.ListTags(ctx, path, n, last)
}

// GetManifest fetches a manifest of the repository with qualified name repo
// from its upstream (Client.GetManifest).
func (s *Set) GetManifest(ctx context.Context, repo, ref string, accept []string) (*Manifest, error) {
	r, path, err := s.Split(repo)
	if err != nil {
		return nil, err
	}
	return r.Client.GetManifest(ctx, path, ref, accept)
}
