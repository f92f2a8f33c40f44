// Package storage is the mirror's cache: content-addressed blobs and
// manifests, tag → digest records and repository links, kept on a
// distribution storage driver (filesystem, or s3-aws through the same code).
//
// # Layout
//
// Under the driver root (layout version 2, see LayoutVersion; paths.go
// builds every path from a typed PathSpec):
//
//	/_layout                                       {"version":2}: the layout of this cache
//	/blobs/<alg>/<hex[0:2]>/<hex>                  blob bytes
//	/manifests/<alg>/<hex[0:2]>/<hex>              "<media type>\n" + manifest bytes
//	/registries/<registry>/<name>/_tags/<tag>      JSON TagRecord
//	/registries/<registry>/<name>/_taglist         JSON TagList (merged upstream pages)
//	/registries/<registry>/<name>/_links/<alg>/<hex>
//	                                               empty: <name> on <registry> holds that digest
//	/_uploads/<random>                             blob bytes being written
//	/_uploads/<random>.live                        heartbeat of the fill writing it (UploadHeartbeat)
//	/_quarantine/<kind>/<alg>/<hex>.<time>         damaged content moved by fsck --repair quarantine
//	/_health/probe                                 written and removed by the readiness probe
//
// <registry> is the upstream's host as its URL names it ("nvcr.io"; a ':'
// before a port is written '_': 127.0.0.1_5000, drivers take no ':'), so a
// mirror pointed at another upstream never serves the first one's tags, and
// several upstreams can share one cache. <name> is the repository path on
// that registry (nvidia/pytorch). Content is stored once by digest whatever
// the registry; links say which repositories may serve it.
//
// A cache of layout 1 (before the version file: tag records and links under
// /repositories/<name>) is migrated by EnsureLayout at start; a cache of a
// newer layout is refused.
//
// Nothing partial is ever visible at a final path: blobs are written under
// /_uploads, verified (size and digest), then moved into place; manifests and
// tag records are written with putContent, which is atomic on the filesystem
// (temporary file and rename) and on S3 (the driver's PutContent, a single
// PutObject).
// Repository path components cannot start with '_' (distribution/reference
// grammar), so "_tags" and "_links" never collide with a repository name.
//
// The code is split by concern: store.go (the Store, events, usage),
// content.go (blobs and manifests), tags.go, links.go, paths.go (the
// layout), layout.go (version and migration), maintain.go (fsck, gc,
// listing, removal) and open.go (drivers and their capabilities).
package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/google/uuid"
	"github.com/opencontainers/go-digest"
)

// Errors returned by Store. Compare with errors.Is.
var (
	// ErrNotFound: the blob, manifest or tag is not cached.
	ErrNotFound = errors.New("storage: not found")
	// ErrDigestMismatch: content written did not hash to the expected digest.
	ErrDigestMismatch = errors.New("storage: digest mismatch")
	// ErrSizeMismatch: content written was not of the expected size.
	ErrSizeMismatch = errors.New("storage: size mismatch")
	// ErrUnsupportedDigest: the digest algorithm is not available.
	ErrUnsupportedDigest = errors.New("storage: unsupported digest algorithm")
	// ErrNotCached: the content was verified but could not be stored.
	ErrNotCached = errors.New("storage: content verified but not cached")
)

// Kind says what a cached object is: a blob or a manifest.
type Kind string

// Kinds of cached objects.
const (
	KindBlob     Kind = "blob"
	KindManifest Kind = "manifest"
)

// Kinds lists every Kind.
var Kinds = []Kind{KindBlob, KindManifest}

// Store is the cache. It is safe for concurrent use.
type Store struct {
	d         driver.StorageDriver
	localRoot string // see WithLocalRoot
	caps      Capabilities

	usageMu sync.Mutex
	usage   map[Kind]*Usage
	// counted holds the size each counted object was counted with (about
	// 120 bytes an object), so that content removed behind the Store (by
	// another process: mirror fsck --repair, mirror gc, an operator) and
	// cached again counts once.
	counted map[Kind]map[digest.Digest]int64

	notify atomic.Pointer[func(Event)] // see Notify

	// links remembers links known to exist: nothing removes a link, so a
	// positive answer never goes stale, and a cache-hit blob GET needs no
	// stat (an S3 HEAD) for it. Bounded by maxKnownLinks.
	linksMu sync.Mutex
	links   map[string]struct{} // Repo.String() + "@" + digest
}

// Event is a change of the cache's content made through this Store: a blob
// or manifest that became visible (a fill's commit, PutManifest) or that
// was removed (RemoveBlob, RemoveManifest, GC). Content another process
// adds or removes is not reported.
type Event struct {
	Kind    Kind
	Digest  digest.Digest
	Size    int64 // bytes as stored (a manifest's media type line included)
	Removed bool
}

// Notify makes the store call f after each Event, on the goroutine that
// made the change; f must be quick and must not call back into the store.
// One observer at a time: a later call replaces f (nil: none). Set it
// before the store is used.
func (s *Store) Notify(f func(Event)) {
	if f == nil {
		s.notify.Store(nil)
		return
	}
	s.notify.Store(&f)
}

func (s *Store) emit(ev Event) {
	if f := s.notify.Load(); f != nil {
		(*f)(ev)
	}
}

// Usage is how much content of one kind the cache holds.
type Usage struct {
	Bytes   int64
	Objects int64
}

// New returns a Store on d.
func New(d driver.StorageDriver, opts ...Option) *Store {
	s := &Store{d: d, usage: map[Kind]*Usage{KindBlob: {}, KindManifest: {}},
		counted: map[Kind]map[digest.Digest]int64{KindBlob: {}, KindManifest: {}}}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Option configures a Store.
type Option func(*Store)

// WithLocalRoot says that d is distribution's filesystem driver rooted at
// dir. Blob uploads are then written unbuffered, straight to their file, so
// that a fill can stream them to clients from that file (BlobWriter.LocalPath)
// instead of writing every byte twice.
func WithLocalRoot(dir string) Option {
	return func(s *Store) { s.localRoot, s.caps.LocalDir = dir, dir }
}

// Usage returns the bytes and objects of kind that this process has
// counted: what Scan found plus what was added since, less what it removed
// (each digest once).
func (s *Store) Usage(kind Kind) (bytes, objects int64) {
	s.usageMu.Lock()
	defer s.usageMu.Unlock()
	if u := s.usage[kind]; u != nil {
		return u.Bytes, u.Objects
	}
	return 0, 0
}

// addUsage counts object d of kind with bytes; an object counted already
// keeps one count, with its new size.
func (s *Store) addUsage(kind Kind, d digest.Digest, bytes int64) {
	s.usageMu.Lock()
	defer s.usageMu.Unlock()
	u, c := s.usage[kind], s.counted[kind]
	if u == nil {
		return
	}
	if prev, ok := c[d]; ok {
		u.Bytes += bytes - prev
	} else {
		u.Bytes += bytes
		u.Objects++
	}
	c[d] = bytes
}

// Scan lists the cache once, adds what it holds to Usage and returns the
// objects (for the evictor's seed: one listing serves both). Run it at
// start-up; it reads every directory of the cache (not the content).
func (s *Store) Scan(ctx context.Context) ([]Object, error) {
	objs, err := s.Objects(ctx)
	for _, o := range objs {
		s.addUsage(o.Kind, o.Digest, o.Size)
	}
	return objs, err
}

// Driver returns the underlying storage driver.
func (s *Store) Driver() driver.StorageDriver { return s.d }

// translate maps driver errors to this package's sentinels.
func translate(err error) error {
	var nf driver.PathNotFoundError
	if errors.As(err, &nf) {
		return fmt.Errorf("%w: %s", ErrNotFound, nf.Path)
	}
	return err
}

// putContent writes raw at driver path p whole or not at all, as the
// driver's PutContent does (a temporary file and a rename on the
// filesystem, one PutObject on S3). With a local root the store writes the
// temporary file itself and removes it when the write fails: the
// filesystem driver's PutContent leaves it behind when the failure shows
// at its commit (ENOSPC, EDQUOT and EIO surface at the final flush or
// fsync), an empty <name>.<uuid>.tmp kept for good per failed write, on a
// full disk one per /readyz probe. The temporary name has the driver's
// form (pendingPut); the file is synced before the rename and the
// directory after it, as the driver does.
func (s *Store) putContent(ctx context.Context, p string, raw []byte) error {
	if s.localRoot == "" {
		return s.d.PutContent(ctx, p, raw)
	}
	final := filepath.Join(s.localRoot, filepath.FromSlash(p))
	dir := filepath.Dir(final)
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return err
	}
	tmp := final + "." + uuid.NewString() + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o666)
	if err != nil {
		return err
	}
	_, err = f.Write(raw)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Probe checks that the cache accepts a write: it writes and removes a
// small object (HealthPath, one for every replica sharing the storage).
func (s *Store) Probe(ctx context.Context) error {
	p := mustPath(HealthPath{})
	if err := s.putContent(ctx, p, []byte("ok")); err != nil {
		return fmt.Errorf("storage: probe write: %w", err)
	}
	// Replicas sharing a bucket probe the same object: one may remove it
	// between this write and this removal. The write worked, which is
	// what the probe asks.
	if err := translate(s.d.Delete(ctx, p)); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return nil
}

// PurgeTemporary removes the temporary files of writes that never ended
// (<name>.<uuid>.tmp: a crash during a write, or a failed write of a mirror
// before putContent, one per /readyz probe on a full disk) from a cache on
// the local disk, and returns how many it removed. Blobs are written under
// /_uploads (PurgeUploads), so /blobs is not walked. Like PurgeUploads it
// must run before this process writes (at start-up), and only where no
// other process shares the storage; without a local root it does nothing.
func (s *Store) PurgeTemporary(ctx context.Context) (int, error) {
	if s.localRoot == "" {
		return 0, nil
	}
	blobs := filepath.Join(s.localRoot, "blobs")
	n := 0
	err := filepath.WalkDir(s.localRoot, func(p string, d os.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case ctx.Err() != nil:
			return ctx.Err()
		case d.IsDir() && p == blobs:
			return filepath.SkipDir
		case d.Type().IsRegular() && pendingPut.MatchString(d.Name()):
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			n++
		}
		return nil
	})
	return n, err
}

// PurgeUploads removes uploads left by fills that a crash interrupted and
// returns how many uploads it found (their heartbeat markers not counted).
// It must run before this process starts fills (at start-up), and only
// where no other process shares the storage.
func (s *Store) PurgeUploads(ctx context.Context) (int, error) {
	dir := mustPath(UploadsPath{})
	names, err := s.d.List(ctx, dir)
	if err = translate(err); errors.Is(err, ErrNotFound) {
		return 0, nil
	} else if err != nil {
		return 0, err
	}
	n := 0
	for _, p := range names {
		if !strings.HasSuffix(p, liveSuffix) {
			n++
		}
	}
	if err := translate(s.d.Delete(ctx, dir)); err != nil && !errors.Is(err, ErrNotFound) {
		return 0, err
	}
	return n, nil
}
