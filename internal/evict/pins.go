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
	Registry   string // "": Options.Registry
	Repository string
	Tag        string        // "" when Digest is set
	Digest     digest.Digest // "" when Tag is set
}

// ParsePin parses "repository:tag" or "repository@sha256:..."
// (names.ParseReference; with both, the digest). The repository is a path
// on the upstream (nvidia/pytorch), without a registry host.
func ParsePin(s string) (Pin, error) {
	r, err := names.ParseReference(s)
	if err != nil || r.Registry != "" {
		return Pin{}, fmt.Errorf("evict: pin %q: want repository:tag or repository@digest", s)
	}
	if r.Ref() == "" {
		return Pin{}, fmt.Errorf("evict: pin %q names no tag or digest", s)
	}
	p := Pin{Repository: r.Repository, Digest: r.Digest}
	if p.Digest == "" {
		p.Tag = r.Tag
	}
	return p, nil
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
// children, and their config and layer blobs.
func (e *Evictor) pinned(ctx context.Context, byDigest map[digest.Digest][]*item) (map[digest.Digest]bool, error) {
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
		if out[d] || depth > 8 {
			return nil
		}
		out[d] = true
		var en *entry
		isManifest := false
		for _, it := range byDigest[d] {
			if it.k.kind == kManifest {
				en, isManifest = it.en, true
			}
		}
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
			reg := p.Registry
			if reg == "" {
				reg = e.opts.Registry
			}
			rec, err := e.store.GetTag(ctx, storage.Repo{Registry: reg, Name: p.Repository}, p.Tag)
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
