package evict

import (
	"context"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// Unlimited is the budget of a cache without one (no cache.max_size or
// cache.min_free): it admits every blob and has nothing to track, lease,
// pin or evict. It offers the Evictor's methods that the fill group, the
// pull-through service and cmd/mirror call.
type Unlimited struct{}

// Admit admits every blob.
func (Unlimited) Admit(context.Context, digest.Digest, int64) (func(), error) { return func() {}, nil }

// Touch does nothing.
func (Unlimited) Touch(storage.Kind, digest.Digest) {}

// Lease does nothing and never fails.
func (Unlimited) Lease(context.Context, digest.Digest) (func(), error) { return func() {}, nil }

// SeedObjects does nothing.
func (Unlimited) SeedObjects([]storage.Object) {}

// SetPinSource does nothing: nothing is evicted.
func (Unlimited) SetPinSource(string, PinSource) {}

// Share returns at once: there is nothing to share.
func (Unlimited) Share(context.Context) {}

// Run returns at once: there are no passes.
func (Unlimited) Run(context.Context) {}
