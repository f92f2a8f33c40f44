package evict

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Pins: images eviction keeps whatever their access times.

// Pin names an image that eviction keeps: a tag (the manifest the cache's
// tag record points at, whatever it is at the time of a pass) or a digest.
type Pin struct {
	Registry string // "": the registry a qualified Repository names, else Options.Registry
	// Repository is the path on Registry, or, with Registry "", a
	// qualified name (names.QualifiedName: docker.io/library/python on a
	// further upstream, a bare path on the default one).
	Repository string
	Tag        string        // "" when Digest is set
	Digest     digest.Digest // "" when Tag is set
}

// ParsePin parses a cache.pin entry with names.ParseImage (the syntax of
// the admin API's images): [host/]repository:tag or
// [host/]repository@sha256:..., where host is one of hosts (nvcr.io, the
// upstream's host, upstream.ns_aliases) or of others (further upstreams'
// registry names: docker.io/library/python:3.12). The pin's Registry is ""
// and its Repository the qualified name. A digest wins over a tag given
// with it. Errors wrap names.ErrNameInvalid, names.ErrTagInvalid or
// names.ErrDigestInvalid.
func ParsePin(s string, hosts []string, others ...string) (Pin, error) {
	r, err := names.ParseImage(s, hosts, others...)
	if err != nil {
		return Pin{}, fmt.Errorf("evict: pin: %w", err)
	}
	if r.Digest != "" {
		return Pin{Repository: r.Repository, Digest: r.Digest}, nil
	}
	return Pin{Repository: r.Repository, Tag: r.Tag}, nil
}

// String returns the pin as ParsePin reads it.
func (p Pin) String() string {
	if p.Digest != "" {
		return p.Repository + "@" + p.Digest.String()
	}
	return p.Repository + ":" + p.Tag
}

// PinSource returns images to keep, for example those a prefetch rule
// matches. It is called at the start of each eviction pass.
type PinSource func(ctx context.Context) ([]Pin, error)

// SetPinSource registers f under name (replacing an earlier one of that
// name; nil removes it). Each pass calls every source and keeps what they
// pin; a source that fails keeps its previous answer.
func (e *Evictor) SetPinSource(name string, f PinSource) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if f == nil {
		delete(e.sources, name)
		delete(e.lastPins, name)
		return
	}
	e.sources[name] = f
}

// pinned returns the digests pins cover: the pinned manifests, their
// children, and their config and layer blobs. manifest returns the index
// entry of a cached manifest.
func (e *Evictor) pinned(ctx context.Context, manifest func(digest.Digest) (*entry, bool)) (map[digest.Digest]bool, error) {
	pins := slices.Clone(e.opts.Pins)
	e.mu.Lock()
	sources := make(map[string]PinSource, len(e.sources))
	for n, f := range e.sources {
		sources[n] = f
	}
	e.mu.Unlock()
	for name, f := range sources {
		ps, err := f(ctx)
		e.mu.Lock()
		if err != nil {
			e.log.Warn("pin source failed; keeping what it pinned last", "source", name, "err", err)
			ps = e.lastPins[name]
		} else if _, still := e.sources[name]; still {
			e.lastPins[name] = ps
		}
		e.mu.Unlock()
		pins = append(pins, ps...)
	}
	out := map[digest.Digest]bool{}
	var walk func(d digest.Digest, depth int) error
	walk = func(d digest.Digest, depth int) error {
		if out[d] || depth > maxDepth {
			return nil
		}
		out[d] = true
		en, isManifest := manifest(d)
		if !isManifest && depth > 0 {
			return nil // a blob (or a child manifest not cached)
		}
		refs, err := e.refs(ctx, d, en)
		if err != nil {
			return err
		}
		for _, r := range refs {
			if err := walk(r, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range pins {
		d := p.Digest
		if d == "" {
			reg, name := p.Registry, p.Repository
			if reg == "" {
				if reg, name = names.SplitQualified(p.Repository); reg == "" {
					reg = e.opts.Registry
				}
			}
			rec, err := e.store.GetTag(ctx, storage.Repo{Registry: reg, Name: name}, p.Tag)
			if errors.Is(err, storage.ErrNotFound) {
				continue // not cached: nothing to keep
			}
			if err != nil {
				return nil, fmt.Errorf("evict: resolving pin %s: %w", p, err)
			}
			d = rec.Digest
		}
		if err := walk(d, 0); err != nil {
			return nil, err
		}
	}
	return out, nil
}
