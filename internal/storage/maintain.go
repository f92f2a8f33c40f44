package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
)

// Repair says what Check does with damaged content.
type Repair int

// Repair modes.
const (
	ReportOnly Repair = iota // leave it, report it
	Quarantine               // move it under /_quarantine, out of the cache
	Delete                   // remove it
)

// Damage is one cached object whose content does not match its digest.
type Damage struct {
	Kind    Kind
	Digest  digest.Digest
	Path    string // driver path
	Problem string
}

// CheckProgress is called after each object with the objects and bytes
// checked so far and the totals (counted before checking starts).
type CheckProgress func(objects, totalObjects, bytes, totalBytes int64)

type object struct {
	kind Kind
	path string
	dgst digest.Digest
	size int64
	mod  time.Time
}

// objects lists the cached blobs and manifests (path, digest from the path,
// size, modification time).
func (s *Store) objects(ctx context.Context) ([]object, error) {
	var out []object
	err := s.eachObject(ctx, func(o object) { out = append(out, o) })
	return out, err
}

// eachObject calls f with each cached blob and manifest, as listed.
func (s *Store) eachObject(ctx context.Context, f func(object)) error {
	for _, kind := range Kinds {
		root := mustPath(ContentRoot{kind})
		err := s.d.Walk(ctx, root, func(fi driver.FileInfo) error {
			if fi.IsDir() || pendingPut.MatchString(fi.Path()) {
				return nil
			}
			// <root>/<alg>/<ab>/<hex>
			parts := strings.Split(strings.TrimPrefix(fi.Path(), root+"/"), "/")
			if len(parts) != 3 {
				return nil
			}
			d := digest.NewDigestFromEncoded(digest.Algorithm(parts[0]), parts[2])
			f(object{kind: kind, path: fi.Path(), dgst: d, size: fi.Size(), mod: fi.ModTime()})
			return nil
		})
		if err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
			return fmt.Errorf("storage: listing %s: %w", root, err)
		}
	}
	return nil
}

// Tally counts the objects an operation looked at (Check, GC): blobs,
// manifests and their bytes as stored.
type Tally struct {
	Blobs, Manifests int
	Bytes            int64
}

func (c *Tally) count(o object) {
	if o.kind == KindManifest {
		c.Manifests++
	} else {
		c.Blobs++
	}
	c.Bytes += o.size
}

// CheckResult is what Check rehashed (Checked) and what it found damaged:
// the objects whose content does not match their digest.
type CheckResult struct {
	Checked Tally
	Damaged []Damage
}

// Check rehashes every cached blob and manifest and returns those whose
// content does not match the digest they are stored under (or whose name
// is not a valid digest), after applying repair to them, with the counts
// of what it rehashed. It is safe while the mirror serves: objects are
// immutable once visible.
func (s *Store) Check(ctx context.Context, repair Repair, progress CheckProgress) (CheckResult, error) {
	var res CheckResult
	objs, err := s.objects(ctx)
	if err != nil {
		return res, err
	}
	var totalBytes int64
	for _, o := range objs {
		totalBytes += o.size
	}
	for i, o := range objs {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if problem := s.verify(ctx, o); problem != "" && !s.vanished(ctx, o) {
			d := Damage{Kind: o.kind, Digest: o.dgst, Path: o.path, Problem: problem}
			if err := s.repair(ctx, o, repair); err != nil {
				d.Problem += fmt.Sprintf(" (repair failed: %v)", err)
			}
			res.Damaged = append(res.Damaged, d)
		}
		res.Checked.count(o)
		if progress != nil {
			progress(int64(i+1), int64(len(objs)), res.Checked.Bytes, totalBytes)
		}
	}
	return res, nil
}

// vanished reports whether o is gone from the store: removed by gc or
// eviction while fsck ran (the mirror may serve meanwhile). That is not
// damage.
func (s *Store) vanished(ctx context.Context, o object) bool {
	_, err := s.d.Stat(ctx, o.path)
	return errors.As(err, new(driver.PathNotFoundError))
}

func (s *Store) verify(ctx context.Context, o object) string {
	if err := o.dgst.Validate(); err != nil {
		return "the file name is not a valid digest"
	}
	rc, err := s.d.Reader(ctx, o.path, 0)
	if err != nil {
		return "unreadable: " + err.Error()
	}
	defer rc.Close()
	h := o.dgst.Algorithm().Hash()
	if o.kind == KindManifest {
		raw, err := io.ReadAll(io.LimitReader(rc, 64<<20))
		if err != nil {
			return "unreadable: " + err.Error()
		}
		_, body, ok := bytes.Cut(raw, []byte("\n"))
		if !ok {
			return "no media type line"
		}
		h.Write(body)
	} else if _, err := io.Copy(h, rc); err != nil {
		return "unreadable: " + err.Error()
	}
	if got := digest.NewDigest(o.dgst.Algorithm(), h); got != o.dgst {
		return "content hashes to " + got.String()
	}
	return ""
}

func (s *Store) repair(ctx context.Context, o object, r Repair) error {
	var err error
	switch r {
	case Quarantine:
		dst := mustPath(QuarantinePath{Kind: o.kind, Digest: o.dgst, At: time.Now()})
		err = translate(s.d.Move(ctx, o.path, dst))
	case Delete:
		err = translate(s.d.Delete(ctx, o.path))
	default:
		return nil
	}
	if err == nil { // out of the cache
		s.subUsage(o.kind, o.dgst)
		s.emit(Event{Kind: o.kind, Digest: o.dgst, Size: o.size, Removed: true})
	}
	return err
}

// uploadLive reports whether the fill writing upload p still runs: its
// marker was written within UploadLiveFor (see UploadHeartbeat). An error
// reading the marker other than its absence counts as live: gc never
// guesses a running fill dead.
func (s *Store) uploadLive(ctx context.Context, p string) bool {
	fi, err := s.d.Stat(ctx, p+liveSuffix)
	if errors.As(err, new(driver.PathNotFoundError)) {
		return false
	}
	return err != nil || time.Since(fi.ModTime()) <= UploadLiveFor
}

// GCResult is what GC looked at (Checked: every cached blob and manifest)
// and removed (or would remove, in a dry run).
type GCResult struct {
	Checked     Tally
	Blobs       int
	BlobBytes   int64
	Uploads     int
	UploadBytes int64
}

// GC removes blobs that no cached manifest refers to, and uploads left by
// interrupted fills. It is safe while the mirror serves, from this or
// another process: a blob younger than grace is kept (a fill may have just
// committed a blob whose manifest has not been asked for yet), an upload
// whose fill still runs (its heartbeat marker, see UploadHeartbeat) is
// never removed, even with a grace of 0, nor one younger than grace, and a
// client already streaming a removed blob keeps its open file on a local
// disk. With dryRun nothing is removed.
func (s *Store) GC(ctx context.Context, grace time.Duration, dryRun bool) (GCResult, error) {
	var res GCResult
	objs, err := s.objects(ctx)
	if err != nil {
		return res, err
	}
	// Mark: everything a cached manifest refers to.
	live := map[digest.Digest]bool{}
	for _, o := range objs {
		res.Checked.count(o)
		if o.kind != KindManifest {
			continue
		}
		m, err := s.GetManifest(ctx, o.dgst)
		if err != nil {
			continue // damaged: fsck's business; its references are unknown
		}
		refs, _ := manifest.References(m.Body)
		for _, r := range refs {
			live[r.Digest] = true
		}
	}
	cutoff := time.Now().Add(-grace)
	for _, o := range objs {
		if o.kind != KindBlob || live[o.dgst] || o.mod.After(cutoff) {
			continue
		}
		if !dryRun {
			if err := s.d.Delete(ctx, o.path); err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
				return res, fmt.Errorf("storage: removing %s: %w", o.path, err)
			}
			s.subUsage(KindBlob, o.dgst)
			s.emit(Event{Kind: KindBlob, Digest: o.dgst, Size: o.size, Removed: true})
		}
		res.Blobs++
		res.BlobBytes += o.size
	}
	err = s.d.Walk(ctx, mustPath(UploadsPath{}), func(fi driver.FileInfo) error {
		if fi.IsDir() || fi.ModTime().After(cutoff) || pendingPut.MatchString(fi.Path()) {
			return nil
		}
		if strings.HasSuffix(fi.Path(), liveSuffix) {
			// The marker of a fill that stopped beating (it died): it
			// goes, and its upload with it (here or below).
			if !dryRun && time.Since(fi.ModTime()) > UploadLiveFor {
				if err := s.d.Delete(ctx, fi.Path()); err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
					return err
				}
			}
			return nil
		}
		if s.uploadLive(ctx, fi.Path()) {
			return nil // a running fill's: never touched, whatever the grace
		}
		if !dryRun {
			if err := s.d.Delete(ctx, fi.Path()); err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
				return err
			}
		}
		res.Uploads++
		res.UploadBytes += fi.Size()
		return nil
	})
	if err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
		return res, fmt.Errorf("storage: removing stale uploads: %w", err)
	}
	return res, nil
}

// Object is one cached blob or manifest as listed by Objects.
type Object struct {
	Kind    Kind
	Digest  digest.Digest // from the path; may fail Validate for a stray file
	Size    int64         // bytes as stored
	ModTime time.Time     // when it was written (the driver's modification time)
}

// Objects lists every cached blob and manifest. It reads every directory of
// the cache (not the content); run it in the background on a large cache.
func (s *Store) Objects(ctx context.Context) ([]Object, error) {
	var out []Object // without the paths: a listing of 200,000 objects is held at once
	err := s.eachObject(ctx, func(o object) {
		out = append(out, Object{Kind: o.kind, Digest: o.dgst, Size: o.size, ModTime: o.mod})
	})
	return out, err
}

// RemoveBlob deletes the cached blob dgst and returns the bytes it held, or
// an error wrapping ErrNotFound when it is not cached. A client already
// streaming it from a local disk keeps its open file; on S3 a read that
// starts after the removal fails, so callers must not remove a blob that is
// being served (see internal/evict's leases).
func (s *Store) RemoveBlob(ctx context.Context, dgst digest.Digest) (int64, error) {
	return s.remove(ctx, KindBlob, dgst)
}

// RemoveManifest deletes the cached manifest dgst (tag records pointing at
// it stay; the proxy refetches a tag whose manifest is missing) and returns
// the bytes it held, or an error wrapping ErrNotFound.
func (s *Store) RemoveManifest(ctx context.Context, dgst digest.Digest) (int64, error) {
	return s.remove(ctx, KindManifest, dgst)
}

func (s *Store) remove(ctx context.Context, kind Kind, dgst digest.Digest) (int64, error) {
	spec := PathSpec(BlobPath{dgst})
	if kind == KindManifest {
		spec = ManifestPath{dgst}
	}
	p, err := Path(spec)
	if err != nil {
		return 0, err
	}
	fi, err := s.d.Stat(ctx, p)
	if err != nil {
		return 0, translate(err)
	}
	if err := s.d.Delete(ctx, p); err != nil {
		return 0, translate(err)
	}
	s.subUsage(kind, dgst)
	s.emit(Event{Kind: kind, Digest: dgst, Size: fi.Size(), Removed: true})
	return fi.Size(), nil
}

// subUsage uncounts object d of kind, if it was counted.
func (s *Store) subUsage(kind Kind, d digest.Digest) {
	s.usageMu.Lock()
	defer s.usageMu.Unlock()
	u, c := s.usage[kind], s.counted[kind]
	if u == nil {
		return
	}
	if prev, ok := c[d]; ok {
		u.Bytes -= prev
		u.Objects--
		delete(c, d)
	}
}
