// Package storage is the mirror's cache: content-addressed blobs and
// manifests, and tag → digest records, kept on a distribution storage driver
// (filesystem now, s3-aws through the same code).
//
// Layout under the driver root:
//
//	/blobs/<alg>/<hex[0:2]>/<hex>                blob bytes
//	/manifests/<alg>/<hex[0:2]>/<hex>            "<media type>\n" + manifest bytes
//	/repositories/<name>/_tags/<tag>             JSON TagRecord
//	/repositories/<name>/_taglist                JSON TagList (merged upstream pages)
//	/_uploads/<random>                           blob bytes being written
//
// Nothing partial is ever visible at a final path: blobs are written under
// /_uploads, verified (size and digest), then moved into place; manifests and
// tag records are written with PutContent, which is atomic on the filesystem
// driver (temporary file and rename) and on S3 (a single PutObject).
// Repository path components cannot start with '_' (distribution/reference
// grammar), so "_tags" never collides with a repository name.
package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
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

const uploadsDir = "/_uploads"

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

	usageMu sync.Mutex
	usage   map[Kind]*Usage

	notify atomic.Pointer[func(Event)] // see Notify

	// links remembers links known to exist: nothing removes a link, so a
	// positive answer never goes stale, and a cache-hit blob GET needs no
	// stat (an S3 HEAD) for it. Bounded by maxKnownLinks.
	linksMu sync.Mutex
	links   map[string]struct{} // repo + "@" + digest
}

// maxKnownLinks bounds Store.links (about 100 bytes each).
const maxKnownLinks = 100_000

func (s *Store) knownLink(repo string, d digest.Digest) bool {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	_, ok := s.links[repo+"@"+string(d)]
	return ok
}

func (s *Store) rememberLink(repo string, d digest.Digest) {
	s.linksMu.Lock()
	defer s.linksMu.Unlock()
	if s.links == nil || len(s.links) >= maxKnownLinks {
		s.links = map[string]struct{}{}
	}
	s.links[repo+"@"+string(d)] = struct{}{}
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
	s := &Store{d: d, usage: map[Kind]*Usage{KindBlob: {}, KindManifest: {}}}
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
func WithLocalRoot(dir string) Option { return func(s *Store) { s.localRoot = dir } }

// Usage returns the bytes and objects of kind that this process has
// counted: what Scan found plus what was added since.
func (s *Store) Usage(kind Kind) (bytes, objects int64) {
	s.usageMu.Lock()
	defer s.usageMu.Unlock()
	if u := s.usage[kind]; u != nil {
		return u.Bytes, u.Objects
	}
	return 0, 0
}

func (s *Store) addUsage(kind Kind, bytes int64) {
	s.usageMu.Lock()
	u := s.usage[kind]
	u.Bytes += bytes
	u.Objects++
	s.usageMu.Unlock()
}

// Scan lists the cache once, adds what it holds to Usage and returns the
// objects (for the evictor's seed: one listing serves both). Run it at
// start-up; it reads every directory of the cache (not the content).
func (s *Store) Scan(ctx context.Context) ([]Object, error) {
	objs, err := s.Objects(ctx)
	for _, o := range objs {
		s.addUsage(o.Kind, o.Size)
	}
	return objs, err
}

// Driver returns the underlying storage driver.
func (s *Store) Driver() driver.StorageDriver { return s.d }

func contentPath(kind string, dgst digest.Digest) (string, error) {
	if err := dgst.Validate(); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnsupportedDigest, err)
	}
	h := dgst.Encoded()
	return path.Join("/", kind, string(dgst.Algorithm()), h[:2], h), nil
}

// translate maps driver errors to this package's sentinels.
func translate(err error) error {
	var nf driver.PathNotFoundError
	if errors.As(err, &nf) {
		return fmt.Errorf("%w: %s", ErrNotFound, nf.Path)
	}
	return err
}

// StatBlob returns the size in bytes of the cached blob dgst, or ErrNotFound.
func (s *Store) StatBlob(ctx context.Context, dgst digest.Digest) (int64, error) {
	p, err := contentPath("blobs", dgst)
	if err != nil {
		return 0, err
	}
	fi, err := s.d.Stat(ctx, p)
	if err != nil {
		return 0, translate(err)
	}
	return fi.Size(), nil
}

// OpenBlob opens the cached blob dgst at byte offset, or returns ErrNotFound.
// On the filesystem driver the reader is an *os.File, so copying it to a
// network connection uses sendfile.
func (s *Store) OpenBlob(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	p, err := contentPath("blobs", dgst)
	if err != nil {
		return nil, err
	}
	rc, err := s.d.Reader(ctx, p, offset)
	if err != nil {
		return nil, translate(err)
	}
	return rc, nil
}

// BlobWriter writes one blob to a temporary upload path while hashing it.
// Nothing is visible in the cache until Commit succeeds; Cancel (or a failed
// Commit) removes the upload.
//
// A storage error (a full disk, say) does not stop the writer: the upload is
// abandoned but hashing goes on, so that Commit can still say whether the
// content was right. A cache fill can thus keep streaming to its clients
// when the cache cannot take the blob.
type BlobWriter struct {
	s    *Store
	fw   driver.FileWriter
	path string
	want digest.Digest
	size int64 // expected size in bytes, -1 if unknown
	h    hash.Hash
	n    int64
	werr error // first storage error; the upload is abandoned after it
	done bool

	localPath string // see LocalPath
}

// CreateBlob starts the upload of blob dgst, expected to be size bytes (-1
// when unknown). It returns ErrUnsupportedDigest for digests whose
// algorithm is not available.
func (s *Store) CreateBlob(ctx context.Context, dgst digest.Digest, size int64) (*BlobWriter, error) {
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnsupportedDigest, err)
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, err
	}
	p := uploadsDir + "/" + hex.EncodeToString(id[:])
	w := &BlobWriter{s: s, path: p, want: dgst, size: size, h: dgst.Algorithm().Hash()}
	if s.localRoot != "" {
		lp := filepath.Join(s.localRoot, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(lp), 0o777); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(lp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return nil, err
		}
		// Reserve the blob's space now: a disk too full for it fails here,
		// before any client is answered (it is then served straight from
		// the upstream), not halfway through. Filesystems without
		// fallocate(2) just skip the reservation.
		if size > 0 {
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, size); errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
				_ = f.Close()
				_ = os.Remove(lp)
				return nil, fmt.Errorf("storage: reserving %d bytes for blob %s: %w", size, dgst, err)
			}
		}
		w.fw, w.localPath = &localFileWriter{f: f}, lp
		return w, nil
	}
	fw, err := s.d.Writer(ctx, p, false)
	if err != nil {
		return nil, translate(err)
	}
	w.fw = fw
	return w, nil
}

// LocalPath returns the upload's file on the local disk when the store has
// a local root (WithLocalRoot), else "". Each Write is in that file when it
// returns; the file is renamed by Commit and removed by Cancel, so a reader
// should open it right away and keep its handle.
func (w *BlobWriter) LocalPath() string { return w.localPath }

// localFileWriter is a driver.FileWriter on a local file without a write
// buffer (the filesystem driver's buffers 4 KiB), so that what Write
// returned is readable from the file at once.
type localFileWriter struct {
	f    *os.File
	size int64
}

func (l *localFileWriter) Write(p []byte) (int, error) {
	n, err := l.f.Write(p)
	l.size += int64(n)
	return n, err
}

func (l *localFileWriter) Size() int64                  { return l.size }
func (l *localFileWriter) Close() error                 { return l.f.Close() }
func (l *localFileWriter) Commit(context.Context) error { return l.f.Sync() }
func (l *localFileWriter) Cancel(context.Context) error { return os.Remove(l.f.Name()) }

var _ driver.FileWriter = (*localFileWriter)(nil)

// Write hashes p and appends it to the upload. It always accepts all of p:
// see StorageErr for a storage failure.
func (w *BlobWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	w.n += int64(len(p))
	if w.werr == nil && !w.done {
		if _, err := w.fw.Write(p); err != nil {
			w.werr = err
			w.abandon(context.Background())
		}
	}
	return len(p), nil
}

// StorageErr returns the storage error that made the writer abandon its
// upload, or nil.
func (w *BlobWriter) StorageErr() error { return w.werr }

// Size returns the bytes written so far.
func (w *BlobWriter) Size() int64 { return w.n }

// Verify checks that the bytes written so far are the expected number and
// hash to the expected digest, without committing. It returns an error
// wrapping ErrSizeMismatch or ErrDigestMismatch. Hashing state is kept, so
// Commit may follow.
func (w *BlobWriter) Verify() error {
	if w.size >= 0 && w.n != w.size {
		return fmt.Errorf("%w: wrote %d bytes, want %d", ErrSizeMismatch, w.n, w.size)
	}
	if got := digest.NewDigest(w.want.Algorithm(), w.h); got != w.want {
		return fmt.Errorf("%w: content hashes to %s, want %s", ErrDigestMismatch, got, w.want)
	}
	return nil
}

// Commit checks that the expected number of bytes, hashing to the expected
// digest, were written, then makes the blob visible at its final path. It
// returns an error wrapping ErrSizeMismatch or ErrDigestMismatch when the
// content is wrong, or one wrapping ErrNotCached when the content was right
// but storage failed. The upload is removed on every error.
func (w *BlobWriter) Commit(ctx context.Context) error {
	if w.done {
		return errors.New("storage: blob writer already finished")
	}
	if err := w.Verify(); err != nil {
		_ = w.Cancel(ctx)
		return err
	}
	if w.werr != nil {
		return fmt.Errorf("%w: %w", ErrNotCached, w.werr)
	}
	final, _ := contentPath("blobs", w.want) // validated in CreateBlob
	if err := w.fw.Commit(ctx); err != nil {
		_ = w.Cancel(ctx)
		return fmt.Errorf("%w: committing upload: %w", ErrNotCached, err)
	}
	w.done = true
	if err := w.fw.Close(); err != nil {
		_ = w.s.d.Delete(ctx, w.path)
		return fmt.Errorf("%w: closing upload: %w", ErrNotCached, err)
	}
	_, statErr := w.s.d.Stat(ctx, final) // already there: a fill raced a commit
	if err := w.s.d.Move(ctx, w.path, final); err != nil {
		_ = w.s.d.Delete(ctx, w.path)
		return fmt.Errorf("%w: moving blob into place: %w", ErrNotCached, err)
	}
	if statErr != nil {
		w.s.addUsage(KindBlob, w.n)
		w.s.emit(Event{Kind: KindBlob, Digest: w.want, Size: w.n})
	}
	return nil
}

func (w *BlobWriter) abandon(ctx context.Context) {
	_ = w.fw.Cancel(ctx)
	_ = w.fw.Close()
	_ = w.s.d.Delete(ctx, w.path)
}

// Cancel abandons the upload and removes what was written. It is safe to
// call after Commit or a storage error (it then does nothing more).
func (w *BlobWriter) Cancel(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	if w.werr == nil {
		w.abandon(ctx)
	}
	return nil
}

// Probe checks that the cache accepts a write: it writes and removes a
// small object under /_health.
func (s *Store) Probe(ctx context.Context) error {
	if err := s.d.PutContent(ctx, "/_health/probe", []byte("ok")); err != nil {
		return fmt.Errorf("storage: probe write: %w", err)
	}
	return translate(s.d.Delete(ctx, "/_health/probe"))
}

// PurgeUploads removes uploads left by fills that a crash interrupted. It
// must run before this process starts fills (at start-up), and only where
// no other process shares the storage.
func (s *Store) PurgeUploads(ctx context.Context) error {
	err := translate(s.d.Delete(ctx, uploadsDir))
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// Manifest is a cached manifest: its exact bytes and media type.
type Manifest struct {
	MediaType string
	Digest    digest.Digest
	Body      []byte
}

// GetManifest returns the cached manifest dgst, or ErrNotFound. Its bytes are
// verified against dgst; a damaged record is reported as ErrDigestMismatch.
func (s *Store) GetManifest(ctx context.Context, dgst digest.Digest) (*Manifest, error) {
	p, err := contentPath("manifests", dgst)
	if err != nil {
		return nil, err
	}
	raw, err := s.d.GetContent(ctx, p)
	if err != nil {
		return nil, translate(err)
	}
	mt, body, ok := bytes.Cut(raw, []byte("\n"))
	if !ok || dgst.Algorithm().FromBytes(body) != dgst { // contentPath validated dgst
		return nil, fmt.Errorf("%w: cached manifest %s", ErrDigestMismatch, dgst)
	}
	return &Manifest{MediaType: string(mt), Digest: dgst, Body: body}, nil
}

// PutManifest caches body with mediaType under dgst, after checking that
// body hashes to dgst (ErrDigestMismatch otherwise).
func (s *Store) PutManifest(ctx context.Context, mediaType string, dgst digest.Digest, body []byte) error {
	p, err := contentPath("manifests", dgst)
	if err != nil {
		return err
	}
	if strings.ContainsAny(mediaType, "\r\n") {
		return fmt.Errorf("storage: media type %q contains a line break", mediaType)
	}
	if dgst.Algorithm().FromBytes(body) != dgst {
		return fmt.Errorf("%w: manifest body does not match %s", ErrDigestMismatch, dgst)
	}
	raw := make([]byte, 0, len(mediaType)+1+len(body))
	raw = append(append(append(raw, mediaType...), '\n'), body...)
	_, statErr := s.d.Stat(ctx, p)
	if err := s.d.PutContent(ctx, p, raw); err != nil {
		return translate(err)
	}
	if statErr != nil {
		s.addUsage(KindManifest, int64(len(raw)))
		s.emit(Event{Kind: KindManifest, Digest: dgst, Size: int64(len(raw))})
	}
	return nil
}

// TagRecord is what the cache knows of a tag: the manifest it pointed to and
// when the upstream last confirmed that.
type TagRecord struct {
	Digest      digest.Digest `json:"digest"`
	MediaType   string        `json:"mediaType"`
	Size        int64         `json:"size"`
	ConfirmedAt time.Time     `json:"confirmedAt"`
}

// pendingPut matches the temporary names the filesystem driver's PutContent
// writes before its rename ("<name>.<uuid>.tmp").
var pendingPut = regexp.MustCompile(`\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.tmp$`)

func tagPath(repo, tag string) string {
	return path.Join("/repositories", repo, "_tags", tag)
}

// GetTag returns the record of repo:tag, or ErrNotFound.
func (s *Store) GetTag(ctx context.Context, repo, tag string) (TagRecord, error) {
	raw, err := s.d.GetContent(ctx, tagPath(repo, tag))
	if err != nil {
		return TagRecord{}, translate(err)
	}
	var rec TagRecord
	if err := json.Unmarshal(raw, &rec); err != nil || rec.Digest.Validate() != nil {
		return TagRecord{}, fmt.Errorf("%w: damaged tag record %s:%s", ErrNotFound, repo, tag)
	}
	return rec, nil
}

// PutTag records repo:tag → rec.
func (s *Store) PutTag(ctx context.Context, repo, tag string, rec TagRecord) error {
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return translate(s.d.PutContent(ctx, tagPath(repo, tag), raw))
}

// DeleteTag forgets repo:tag. Deleting an unknown tag is not an error.
func (s *Store) DeleteTag(ctx context.Context, repo, tag string) error {
	err := translate(s.d.Delete(ctx, tagPath(repo, tag)))
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// ListTags returns the cached tags of repo in lexical order, or ErrNotFound
// when the repository has none.
func (s *Store) ListTags(ctx context.Context, repo string) ([]string, error) {
	dir := path.Join("/repositories", repo, "_tags")
	entries, err := s.d.List(ctx, dir)
	if err != nil {
		return nil, translate(err)
	}
	tags := make([]string, 0, len(entries))
	for _, e := range entries {
		name := path.Base(e)
		if pendingPut.MatchString(name) { // a PutContent in progress
			continue
		}
		tags = append(tags, name)
	}
	sort.Strings(tags)
	return tags, nil
}

// TagList is a repository's complete tag list as the upstream last served
// it (all pages merged), and when.
type TagList struct {
	Tags        []string  `json:"tags"`
	Complete    bool      `json:"complete"` // false: cut at the page bound
	ConfirmedAt time.Time `json:"confirmedAt"`
}

func tagListPath(repo string) string { return path.Join("/repositories", repo, "_taglist") }

// GetTagList returns repo's cached tag list, or ErrNotFound.
func (s *Store) GetTagList(ctx context.Context, repo string) (TagList, error) {
	raw, err := s.d.GetContent(ctx, tagListPath(repo))
	if err != nil {
		return TagList{}, translate(err)
	}
	var tl TagList
	if err := json.Unmarshal(raw, &tl); err != nil {
		return TagList{}, fmt.Errorf("%w: damaged tag list of %s", ErrNotFound, repo)
	}
	return tl, nil
}

// PutTagList records repo's tag list (replacing the previous one).
func (s *Store) PutTagList(ctx context.Context, repo string, tl TagList) error {
	raw, err := json.Marshal(tl)
	if err != nil {
		return err
	}
	return translate(s.d.PutContent(ctx, tagListPath(repo), raw))
}

// linkPath is where the cache records that repo's upstream serves dgst (a
// manifest or blob of that repository).
func linkPath(repo string, dgst digest.Digest) (string, error) {
	if err := dgst.Validate(); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnsupportedDigest, err)
	}
	return path.Join("/repositories", repo, "_links", string(dgst.Algorithm()), dgst.Encoded()), nil
}

// PutLinks records that repository repo holds each of dgsts: content is
// cached once by digest, but is served under a repository only when it is
// known to belong to it.
func (s *Store) PutLinks(ctx context.Context, repo string, dgsts ...digest.Digest) error {
	for _, d := range dgsts {
		p, err := linkPath(repo, d)
		if err != nil {
			return err
		}
		if s.knownLink(repo, d) {
			continue
		}
		if _, err := s.d.Stat(ctx, p); err != nil {
			if err := s.d.PutContent(ctx, p, nil); err != nil {
				return translate(err)
			}
		}
		s.rememberLink(repo, d)
	}
	return nil
}

// HasLink reports whether PutLinks recorded dgst for repo.
func (s *Store) HasLink(ctx context.Context, repo string, dgst digest.Digest) (bool, error) {
	p, err := linkPath(repo, dgst)
	if err != nil {
		return false, err
	}
	if s.knownLink(repo, dgst) {
		return true, nil
	}
	_, err = s.d.Stat(ctx, p)
	if err == nil {
		s.rememberLink(repo, dgst)
		return true, nil
	}
	if err = translate(err); errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return false, err
}
