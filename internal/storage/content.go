package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// StatBlob returns the size in bytes of the cached blob dgst, or ErrNotFound.
func (s *Store) StatBlob(ctx context.Context, dgst digest.Digest) (int64, error) {
	p, err := Path(BlobPath{dgst})
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
	p, err := Path(BlobPath{dgst})
	if err != nil {
		return nil, err
	}
	rc, err := s.d.Reader(ctx, p, offset)
	if err != nil {
		return nil, translate(err)
	}
	return rc, nil
}

// CachedBlob is a cached blob found by LookupBlob. Close it when done.
type CachedBlob struct {
	Size int64 // bytes

	s    *Store
	path string        // driver path
	f    *os.File      // the open file on a local disk
	rc   io.ReadCloser // what Reader opened through the driver
}

// LookupBlob finds the cached blob dgst, or returns ErrNotFound. On a local
// disk (WithLocalRoot) it opens the file and takes the size from the open
// file: one open and one fstat, and a removal (gc, eviction) after the
// lookup no longer matters. Elsewhere it stats the blob (one HEAD on S3)
// and opens nothing: a redirect needs no read.
func (s *Store) LookupBlob(ctx context.Context, dgst digest.Digest) (*CachedBlob, error) {
	p, err := Path(BlobPath{dgst})
	if err != nil {
		return nil, err
	}
	b := &CachedBlob{s: s, path: p}
	if s.localRoot != "" {
		f, err := os.Open(filepath.Join(s.localRoot, filepath.FromSlash(p)))
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, p)
		}
		if err != nil {
			return nil, err
		}
		fi, err := f.Stat()
		if err != nil {
			_ = f.Close()
			return nil, err
		}
		b.f, b.Size = f, fi.Size()
		return b, nil
	}
	fi, err := s.d.Stat(ctx, p)
	if err != nil {
		return nil, translate(err)
	}
	b.Size = fi.Size()
	return b, nil
}

// Reader returns the blob's bytes from offset on. On a local disk it is
// the file LookupBlob opened (an *os.File, so that copying it to a network
// connection uses sendfile); elsewhere a read through the driver, which
// returns ErrNotFound when the blob was removed since the lookup. Call it
// once; Close ends it.
func (b *CachedBlob) Reader(ctx context.Context, offset int64) (io.Reader, error) {
	if b.f != nil {
		if _, err := b.f.Seek(offset, io.SeekStart); err != nil {
			return nil, err
		}
		return b.f, nil
	}
	rc, err := b.s.d.Reader(ctx, b.path, offset)
	if err != nil {
		return nil, translate(err)
	}
	b.rc = rc
	return rc, nil
}

// Close releases what LookupBlob and Reader opened.
func (b *CachedBlob) Close() error {
	var err error
	if b.f != nil {
		err = b.f.Close()
	}
	if b.rc != nil {
		err = errors.Join(err, b.rc.Close())
	}
	return err
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
	n    int64 // bytes hashed
	// appended counts the bytes given to the upload (Append), which Commit
	// checks against n: what becomes visible is as long as what was hashed.
	appended int64
	werr     error // first storage error; the upload is abandoned after it
	done     bool

	localPath string // see LocalPath

	known   bool      // see KnownNew
	marker  string    // path of the upload's heartbeat marker (UploadMarkerPath)
	endOnce sync.Once // ends the heartbeat and removes the marker
	stop    func()    // stops the heartbeat and waits for it
}

// An upload is live while the fill writing it runs: the writer creates
// its marker (UploadMarkerPath, "<upload>.live") before the upload and
// rewrites it every UploadHeartbeat until the upload is committed or
// removed. GC (in this process or in another one, `mirror gc`) never
// removes an upload whose marker was written within UploadLiveFor,
// whatever its grace period; a fill that died (a crash, kill -9) stops its
// heartbeat and its upload is then collected like any other. Marker times
// are the store's (the S3 server's clock for a bucket); clocks of gc's
// host and the store must agree within UploadLiveFor minus
// UploadHeartbeat.
const (
	UploadHeartbeat = time.Minute
	UploadLiveFor   = 5 * time.Minute
)

// live writes the upload's marker and starts its heartbeat.
func (w *BlobWriter) live(ctx context.Context) error {
	if err := w.s.putContent(ctx, w.marker, nil); err != nil {
		return translate(err)
	}
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(UploadHeartbeat)
		defer t.Stop()
		for {
			select {
			case <-bctx.Done():
				return
			case <-t.C:
				_ = w.s.putContent(bctx, w.marker, nil) // a missed beat is made up by the next
			}
		}
	}()
	w.stop = func() { cancel(); <-done }
	return nil
}

// endLive stops the heartbeat and removes the marker, once the upload is
// committed or gone.
func (w *BlobWriter) endLive(ctx context.Context) {
	w.endOnce.Do(func() {
		if w.stop != nil {
			w.stop()
		}
		_ = w.s.d.Delete(context.WithoutCancel(ctx), w.marker)
	})
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
	uid := hex.EncodeToString(id[:])
	p := mustPath(UploadPath{ID: uid})
	w := &BlobWriter{s: s, path: p, want: dgst, size: size, h: dgst.Algorithm().Hash(), marker: mustPath(UploadMarkerPath{ID: uid})}
	// The marker before the upload: gc never sees the upload unmarked.
	if err := w.live(ctx); err != nil {
		return nil, err
	}
	created := false
	defer func() {
		if !created {
			w.endLive(ctx)
		}
	}()
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
		created = true
		return w, nil
	}
	fw, err := s.d.Writer(ctx, p, false)
	if err != nil {
		return nil, translate(err)
	}
	w.fw = fw
	created = true
	return w, nil
}

// KnownNew says that the blob is not cached and that no other writer of it
// runs in this process (the caller looked it up and found it missing, and
// holds the one fill of the digest): Commit then counts it as new without
// checking its final path first (a HEAD on S3). A writer in another
// process sharing the storage may still commit the same blob; that is
// harmless (the same bytes), and Usage is this process's view anyway.
func (w *BlobWriter) KnownNew() { w.known = true }

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
	w.Hash(p)
	w.Append(p)
	return len(p), nil
}

// Append appends p to the upload without hashing it; the caller passes the
// same bytes, in the same order, to Hash (Write does both). Append and Hash
// may run on two goroutines at once, each called by one goroutine only, so
// that a cache fill writes one buffer while it hashes the one before; both
// must have returned for good before Verify, Commit or Cancel. A storage
// failure is reported by StorageErr, as for Write.
func (w *BlobWriter) Append(p []byte) {
	w.appended += int64(len(p))
	if w.werr == nil && !w.done {
		if _, err := w.fw.Write(p); err != nil {
			w.werr = err
			w.abandon(context.Background())
		}
	}
}

// Hash adds p to the digest and the byte count that Verify and Commit
// check, without writing it (see Append).
func (w *BlobWriter) Hash(p []byte) {
	w.h.Write(p)
	w.n += int64(len(p))
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
// digest, were written (and, after Append and Hash, that as many bytes were
// appended as hashed), then makes the blob visible at its final path. It
// returns an error wrapping ErrSizeMismatch or ErrDigestMismatch when the
// content is wrong, or one wrapping ErrNotCached when the content was right
// but storage failed. The upload is removed on every error.
func (w *BlobWriter) Commit(ctx context.Context) error {
	if w.done {
		return errors.New("storage: blob writer already finished")
	}
	defer w.endLive(ctx) // after the upload is in place or removed
	if err := w.Verify(); err != nil {
		_ = w.Cancel(ctx)
		return err
	}
	if w.werr != nil {
		return fmt.Errorf("%w: %w", ErrNotCached, w.werr)
	}
	if w.appended != w.n {
		_ = w.Cancel(ctx)
		return fmt.Errorf("%w: appended %d bytes to the upload, hashed %d", ErrSizeMismatch, w.appended, w.n)
	}
	final := mustPath(BlobPath{w.want}) // validated in CreateBlob
	if err := w.fw.Commit(ctx); err != nil {
		_ = w.Cancel(ctx)
		return fmt.Errorf("%w: committing upload: %w", ErrNotCached, err)
	}
	w.done = true
	if err := w.fw.Close(); err != nil {
		_ = w.s.d.Delete(ctx, w.path)
		return fmt.Errorf("%w: closing upload: %w", ErrNotCached, err)
	}
	var statErr error = ErrNotFound
	if !w.known {
		_, statErr = w.s.d.Stat(ctx, final) // already there: a fill raced a commit
	}
	if err := w.s.d.Move(ctx, w.path, final); err != nil {
		_ = w.s.d.Delete(ctx, w.path)
		return fmt.Errorf("%w: moving blob into place: %w", ErrNotCached, err)
	}
	if statErr != nil {
		w.s.addUsage(KindBlob, w.want, w.n)
		w.s.emit(Event{Kind: KindBlob, Digest: w.want, Size: w.n})
	}
	return nil
}

func (w *BlobWriter) abandon(ctx context.Context) {
	_ = w.fw.Cancel(ctx)
	_ = w.fw.Close()
	_ = w.s.d.Delete(ctx, w.path)
	w.endLive(ctx)
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

// Manifest is a cached manifest: its exact bytes and media type.
type Manifest struct {
	MediaType string
	Digest    digest.Digest
	Body      []byte
}

// GetManifest returns the cached manifest dgst, or ErrNotFound. Its bytes are
// verified against dgst; a damaged record is reported as ErrDigestMismatch.
func (s *Store) GetManifest(ctx context.Context, dgst digest.Digest) (*Manifest, error) {
	p, err := Path(ManifestPath{dgst})
	if err != nil {
		return nil, err
	}
	raw, err := s.d.GetContent(ctx, p)
	if err != nil {
		return nil, translate(err)
	}
	mt, body, ok := bytes.Cut(raw, []byte("\n"))
	if !ok || dgst.Algorithm().FromBytes(body) != dgst { // Path validated dgst
		return nil, fmt.Errorf("%w: cached manifest %s", ErrDigestMismatch, dgst)
	}
	return &Manifest{MediaType: string(mt), Digest: dgst, Body: body}, nil
}

// PutManifest caches body with mediaType under dgst, after checking that
// body hashes to dgst (ErrDigestMismatch otherwise).
func (s *Store) PutManifest(ctx context.Context, mediaType string, dgst digest.Digest, body []byte) error {
	p, err := Path(ManifestPath{dgst})
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
	if err := s.putContent(ctx, p, raw); err != nil {
		return translate(err)
	}
	if statErr != nil {
		s.addUsage(KindManifest, dgst, int64(len(raw)))
		s.emit(Event{Kind: KindManifest, Digest: dgst, Size: int64(len(raw))})
	}
	return nil
}

// BlobURL returns a URL from which a client can fetch the cached blob
// directly (a presigned URL on S3, valid for RedirectLifetime), or "" when
// the driver offers none (the filesystem).
func (s *Store) BlobURL(r *http.Request, dgst digest.Digest) (string, error) {
	p, err := Path(BlobPath{dgst})
	if err != nil {
		return "", err
	}
	return s.d.RedirectURL(r, p)
}
