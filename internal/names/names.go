// Package names checks and parses the names that requests, rules and the
// config carry: repository names and tags (the distribution/reference
// grammar), image references (ParseReference; ParseImage for images of
// the upstream) and platforms
// ("os/arch[/variant]").
package names

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

var (
	tag      = regexp.MustCompile(`^` + reference.TagRegexp.String() + `$`)
	platform = regexp.MustCompile(`^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$`)
	domain   = regexp.MustCompile(`^` + reference.DomainRegexp.String() + `$`)
)

// ValidTag reports whether s is a whole tag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
func ValidTag(s string) bool { return tag.MatchString(s) }

// ValidRepository reports whether s is a repository path on the registry
// (nvidia/pytorch, nvidia/k8s/dcgm-exporter): lower-case components
// separated by '/', at most 255 characters, no host.
func ValidRepository(s string) bool {
	if len(s) > reference.NameTotalLengthMax {
		return false
	}
	named, err := reference.ParseNamed("nvcr.io/" + s)
	return err == nil && reference.Path(named) == s
}

// ValidPlatform reports whether s has the form os/arch[/variant]
// (linux/amd64, linux/arm64/v8).
func ValidPlatform(s string) bool { return platform.MatchString(s) }

// Errors of ParseReference and ParseTagOrDigest, by the part at fault (the
// OCI codes NAME_INVALID, TAG_INVALID, DIGEST_INVALID). Compare with
// errors.Is.
var (
	ErrNameInvalid   = errors.New("invalid repository name")
	ErrTagInvalid    = errors.New("invalid tag")
	ErrDigestInvalid = errors.New("invalid digest")
)

// Reference is a parsed image reference,
// [registry/]repository[:tag][@digest].
type Reference struct {
	// Registry is the host[:port] the reference began with, "" when it
	// named none. As in Docker, a first path component is a registry when
	// it contains '.' or ':' or is "localhost".
	Registry string
	// Repository is the path on the registry (nvidia/pytorch).
	Repository string
	Tag        string        // "" when absent
	Digest     digest.Digest // "" when absent; with a tag too, the digest decides
}

// Ref returns what to ask a registry for: the digest when there is one,
// else the tag ("" when neither).
func (r Reference) Ref() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	return r.Tag
}

// String returns the reference as ParseReference reads it.
func (r Reference) String() string {
	s := r.Repository
	if r.Registry != "" {
		s = r.Registry + "/" + s
	}
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	}
	return s
}

// ParseReference parses "[registry/]repository[:tag][@digest]", the one
// reference syntax of the admin API, cache.pin and prefetch requests.
// Neither tag nor digest is required (callers that need one check; see
// ParseImage). A registry must be a host[:port] of the distribution/reference
// grammar. Errors wrap ErrNameInvalid, ErrTagInvalid or ErrDigestInvalid.
func ParseReference(s string) (Reference, error) {
	var r Reference
	rest := s
	if i := strings.IndexByte(rest, '@'); i >= 0 {
		_, d, err := ParseTagOrDigest(rest[i+1:])
		if err != nil || d == "" {
			return r, fmt.Errorf("%w %q in %q", ErrDigestInvalid, rest[i+1:], s)
		}
		r.Digest, rest = d, rest[:i]
	}
	if i := strings.LastIndexByte(rest, ':'); i > strings.LastIndexByte(rest, '/') {
		tag, _, err := ParseTagOrDigest(rest[i+1:])
		if err != nil || tag == "" {
			return r, fmt.Errorf("%w %q in %q: tags are [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", ErrTagInvalid, rest[i+1:], s)
		}
		r.Tag, rest = tag, rest[:i]
	}
	if first, path, ok := strings.Cut(rest, "/"); ok && LooksLikeRegistry(first) {
		if !domain.MatchString(first) {
			return r, fmt.Errorf("%w: %q: registry host %q", ErrNameInvalid, s, first)
		}
		r.Registry, rest = first, path
	}
	if !ValidRepository(rest) {
		return r, fmt.Errorf("%w %q: lower-case path components separated by '/', like nvidia/pytorch", ErrNameInvalid, rest)
	}
	r.Repository = rest
	return r, nil
}

// ParseImage parses an image of the mirror's upstreams, the syntax of
// cache.pin, prefetch and the admin API's "image": ParseReference, then a
// registry, when given, must be one of hosts (the default upstream's names:
// nvcr.io, its URL's host, upstream.ns_aliases; dropped from the result) or
// of others (the registry names of the further upstreams, kept as the
// repository's first component: QualifiedName), compared without case, as
// DNS names are; and a tag or a digest must be given. The Registry of the
// result is always "". Errors wrap ErrNameInvalid (a registry not
// configured, a bad name), ErrTagInvalid (no tag or digest, or a bad tag)
// or ErrDigestInvalid.
func ParseImage(s string, hosts []string, others ...string) (Reference, error) {
	r, err := ParseReference(s)
	if err != nil {
		return Reference{}, err
	}
	if r, err = resolveRegistry(s, r, hosts, others); err != nil {
		return Reference{}, err
	}
	if r.Ref() == "" {
		return Reference{}, fmt.Errorf("%w: %q names no tag or digest (NGC images have no \"latest\" as a rule): want repository:tag or repository@sha256:...", ErrTagInvalid, s)
	}
	return r, nil
}

// ParseRepository parses a repository name of the mirror's upstreams, as
// the admin API's tags and `mirror tags` take it: "[registry/]path" with
// no tag or digest, the registry read as ParseImage reads it (one of hosts
// is dropped, one of others is kept; on docker.io a one-component path
// gets "library/": QualifiedName). It returns the qualified name
// (nvidia/pytorch, docker.io/library/ubuntu). Errors wrap ErrNameInvalid.
func ParseRepository(s string, hosts []string, others ...string) (string, error) {
	r, err := ParseReference(s)
	switch {
	case err != nil:
		return "", fmt.Errorf("%w %q: lower-case path components separated by '/', like nvidia/pytorch", ErrNameInvalid, s)
	case r.Ref() != "":
		return "", fmt.Errorf("%w %q: a repository, without a tag or digest", ErrNameInvalid, s)
	}
	if r, err = resolveRegistry(s, r, hosts, others); err != nil {
		return "", err
	}
	return r.Repository, nil
}

// resolveRegistry applies ParseImage's registry rule to r, parsed from s:
// the result's Registry is "" and its Repository the qualified name.
func resolveRegistry(s string, r Reference, hosts, others []string) (Reference, error) {
	known, other := false, ""
	for _, h := range hosts {
		known = known || (r.Registry != "" && strings.EqualFold(h, r.Registry))
	}
	for _, o := range others {
		if r.Registry != "" && strings.EqualFold(o, r.Registry) {
			other = strings.ToLower(o)
		}
	}
	// The path on the registry never begins with a registry's name, as in
	// the registry API (upstream.Set.Route): nvcr.io/ghcr.io/x is not
	// ghcr.io/x. Nor is the default's repository one alone: ghcr.io is not
	// nvcr.io's repository "ghcr.io" (a further upstream's path may be).
	switch first, _, ok := strings.Cut(r.Repository, "/"); {
	case ok && LooksLikeRegistry(first):
		return Reference{}, fmt.Errorf("%w: %q: a repository path does not begin with a registry name (%q)", ErrNameInvalid, s, first)
	case !ok && other == "" && LooksLikeRegistry(first):
		return Reference{}, fmt.Errorf("%w: %q: %s is a registry's name, not a repository (like %s/org/img)", ErrNameInvalid, s, first, first)
	}
	if r.Registry == "" {
		return r, nil
	}
	switch {
	case other != "":
		r.Repository = QualifiedName(other, r.Repository)
		if !ValidRepository(r.Repository) {
			return Reference{}, fmt.Errorf("%w %q: the name is too long", ErrNameInvalid, s)
		}
	case !known:
		return Reference{}, fmt.Errorf("%w: %q names the registry %q; this mirror serves %s (give the repository path, like nvidia/pytorch:24.05-py3)",
			ErrNameInvalid, s, r.Registry, strings.Join(dedup(append(append([]string(nil), hosts...), others...)), ", "))
	}
	r.Registry = ""
	return r, nil
}

// dedup returns list without repeats, compared without case (registry
// names are DNS names), in first-seen order.
func dedup(list []string) []string {
	out := make([]string, 0, len(list))
	for _, s := range list {
		if !slices.ContainsFunc(out, func(o string) bool { return strings.EqualFold(o, s) }) {
			out = append(out, s)
		}
	}
	return out
}

// DockerHub is Docker Hub's registry name. Its official images are
// library/NAME, which clients write as NAME (docker.io/ubuntu): see
// QualifiedName.
const DockerHub = "docker.io"

// LooksLikeRegistry reports whether the first component of a name is a
// registry host, by Docker's rule (distribution/reference's
// splitDockerDomain): it contains '.' or ':' or is "localhost". Such a
// component never begins a name of the default upstream.
func LooksLikeRegistry(component string) bool {
	return strings.ContainsAny(component, ".:") || component == "localhost"
}

// QualifiedName is the mirror's one name of repository path on the
// registry named registry, as the cache's state, the pull history, access
// rules, pins and prefetch rules know it: the path itself for the default
// upstream (registry ""; nvidia/pytorch), else registry/path
// (ghcr.io/org/img). On docker.io a one-component path is an official
// image and gets "library/" (docker.io/library/ubuntu).
func QualifiedName(registry, path string) string {
	if registry == "" {
		return path
	}
	if registry == DockerHub && !strings.Contains(path, "/") {
		path = "library/" + path
	}
	return registry + "/" + path
}

// SplitQualified is QualifiedName's inverse: the registry of a qualified
// name when its first component LooksLikeRegistry ("" for the default
// upstream) and the repository path on that registry.
func SplitQualified(name string) (registry, path string) {
	if first, rest, ok := strings.Cut(name, "/"); ok && LooksLikeRegistry(first) {
		return first, rest
	}
	return "", name
}

// ParseTagOrDigest parses the reference part of a registry API path
// (/v2/<name>/manifests/<reference>): a digest when it contains ':', else
// a tag. Errors wrap ErrTagInvalid or ErrDigestInvalid.
func ParseTagOrDigest(ref string) (tag string, dgst digest.Digest, err error) {
	if strings.Contains(ref, ":") {
		d, err := digest.Parse(ref)
		if err != nil {
			return "", "", fmt.Errorf("%w %q: %v", ErrDigestInvalid, ref, err)
		}
		return "", d, nil
	}
	if !ValidTag(ref) {
		return "", "", fmt.Errorf("%w %q", ErrTagInvalid, ref)
	}
	return ref, "", nil
}

// MatchRepository matches a repository name against a pattern in which "*"
// matches within one path component and "**" any number of components.
func MatchRepository(pattern, repository string) bool {
	return matchParts(strings.Split(pattern, "/"), strings.Split(repository, "/"))
}

func matchParts(pat, name []string) bool {
	for len(pat) > 0 {
		if pat[0] == "**" {
			if len(pat) == 1 {
				return len(name) > 0
			}
			for i := 0; i <= len(name); i++ {
				if matchParts(pat[1:], name[i:]) {
					return true
				}
			}
			return false
		}
		if len(name) == 0 {
			return false
		}
		if ok, err := path.Match(pat[0], name[0]); err != nil || !ok {
			return false
		}
		pat, name = pat[1:], name[1:]
	}
	return len(name) == 0
}
