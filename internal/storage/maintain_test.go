package storage_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

func putBlob(t *testing.T, s *storage.Store, data []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(data)
	w, err := s.CreateBlob(t.Context(), d, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write(data)
	if err := w.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	return d
}

func blobPath(d digest.Digest) string {
	p, err := storage.Path(storage.BlobPath{Digest: d})
	if err != nil {
		panic(err)
	}
	return p
}

// TestCheckFindsAndRepairsDamage: a blob and a manifest whose bytes no
// longer match their digests are reported; quarantine moves them out of the
// cache, delete removes them, report-only leaves them; sound ones pass.
func TestCheckFindsAndRepairsDamage(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		good := putBlob(t, s, []byte("sound layer"))
		bad := putBlob(t, s, []byte("layer to damage"))
		mbody := []byte(`{"schemaVersion":2,"layers":[]}`)
		md := digest.FromBytes(mbody)
		if err := s.PutManifest(ctx, "application/vnd.oci.image.manifest.v1+json", md, mbody); err != nil {
			t.Fatal(err)
		}
		if err := s.Driver().PutContent(ctx, blobPath(bad), []byte("layer to damagE")); err != nil {
			t.Fatal(err)
		}
		mpath := pathOf(t, storage.ManifestPath{Digest: md})
		if err := s.Driver().PutContent(ctx, mpath, []byte("application/json\n{}")); err != nil {
			t.Fatal(err)
		}
		var calls int64
		res, err := s.Check(ctx, storage.ReportOnly, func(o, to, b, tb int64) { calls = o })
		if err != nil {
			t.Fatal(err)
		}
		dmg := res.Damaged
		if len(dmg) != 2 || calls != 3 {
			t.Fatalf("report: %d damaged (%+v), progress to %d objects; want 2 of 3", len(dmg), dmg, calls)
		}
		// What fsck says it checked (U1 F6).
		wantBytes := int64(len("sound layer")+len("layer to damagE")) + int64(len("application/json\n{}"))
		if c := res.Checked; c.Blobs != 2 || c.Manifests != 1 || c.Bytes != wantBytes {
			t.Errorf("checked %+v, want 2 blobs, 1 manifest, %d bytes", c, wantBytes)
		}
		if _, err := s.StatBlob(ctx, bad); err != nil {
			t.Fatal("report-only removed the blob")
		}
		if res, _ = s.Check(ctx, storage.Quarantine, nil); len(res.Damaged) != 2 {
			t.Fatalf("quarantine: %d damaged", len(res.Damaged))
		}
		if _, err := s.StatBlob(ctx, bad); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("quarantined blob still in the cache: %v", err)
		}
		if files(t, s.Driver(), pathOf(t, storage.QuarantineRoot{})) == nil {
			t.Fatal("nothing under /_quarantine")
		}
		if res, _ = s.Check(ctx, storage.Delete, nil); len(res.Damaged) != 0 || res.Checked.Blobs != 1 || res.Checked.Manifests != 0 {
			t.Fatalf("after quarantine: %+v", res)
		}
		if _, err := s.StatBlob(ctx, good); err != nil {
			t.Fatalf("sound blob gone: %v", err)
		}
	})
}

// TestGCRemovesUnreferencedBlobs: blobs no manifest refers to are removed
// once older than the grace period, referenced and young ones are kept.
func TestGCRemovesUnreferencedBlobs(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		kept := putBlob(t, s, []byte("referenced layer"))
		orphan := putBlob(t, s, []byte("orphan layer"))
		mbody := []byte(`{"schemaVersion":2,"config":{"digest":"` + kept.String() + `","size":16},"layers":[]}`)
		md := digest.FromBytes(mbody)
		if err := s.PutManifest(ctx, "application/vnd.oci.image.manifest.v1+json", md, mbody); err != nil {
			t.Fatal(err)
		}
		// Within the grace period nothing goes.
		res, err := s.GC(ctx, time.Hour, false)
		if err != nil || res.Blobs != 0 {
			t.Fatalf("young orphan removed: %+v, %v", res, err)
		}
		res, err = s.GC(ctx, 0, true)
		if err != nil || res.Blobs != 1 || res.Checked.Blobs != 2 || res.Checked.Manifests != 1 {
			t.Fatalf("dry run: %+v, %v", res, err)
		}
		if _, err := s.StatBlob(ctx, orphan); err != nil {
			t.Fatal("dry run removed the orphan")
		}
		res, err = s.GC(ctx, 0, false)
		if err != nil || res.Blobs != 1 || res.BlobBytes != int64(len("orphan layer")) {
			t.Fatalf("gc: %+v, %v", res, err)
		}
		if _, err := s.StatBlob(ctx, orphan); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("orphan still cached: %v", err)
		}
		if _, err := s.StatBlob(ctx, kept); err != nil {
			t.Fatalf("referenced blob removed: %v", err)
		}
		// A stale upload goes too: one a fill that died left behind (no
		// heartbeat marker).
		if err := s.Driver().PutContent(ctx, "/_uploads/0123456789abcdef0123456789abcdef", []byte("x")); err != nil {
			t.Fatal(err)
		}
		if res, err = s.GC(ctx, 0, false); err != nil || res.Uploads != 1 {
			t.Fatalf("stale upload: %+v, %v", res, err)
		}
		if f := files(t, s.Driver(), pathOf(t, storage.UploadsPath{})); len(f) != 0 {
			t.Fatalf("stale upload still there: %v", f)
		}
	})
}

// hookDriver runs beforeMove before each Move: the moment a fill's upload
// is complete in the store and about to become the blob.
type hookDriver struct {
	driver.StorageDriver
	beforeMove func()
}

func (d hookDriver) Move(ctx context.Context, from, to string) error {
	d.beforeMove()
	return d.StorageDriver.Move(ctx, from, to)
}

// TestGCNeverTouchesARunningFill: gc from another process (another Store
// on the same storage), even with a grace of 0, leaves the upload of a
// fill that is still writing, and the one complete in the store but not
// moved into place yet (the moment an S3 upload is visible); both fills
// then commit. A fill that died (its marker no longer beats) is collected.
func TestGCNeverTouchesARunningFill(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		other := storage.New(s.Driver()) // `mirror gc`: shares nothing with s but the storage
		gc := func(when string) {
			t.Helper()
			if res, err := other.GC(ctx, 0, false); err != nil || res.Uploads != 0 {
				t.Errorf("gc %s: %+v, %v; want no upload removed", when, res, err)
			}
		}
		data := bytes.Repeat([]byte("layer bytes "), 10_000)
		d := digest.FromBytes(data)
		w, err := s.CreateBlob(ctx, d, int64(len(data)))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write(data[:len(data)/2])
		gc("while the fill writes")
		_, _ = w.Write(data[len(data)/2:])
		if err := w.Commit(ctx); err != nil {
			t.Fatalf("commit after gc: %v", err)
		}
		if _, err := s.StatBlob(ctx, d); err != nil {
			t.Fatalf("blob not cached: %v", err)
		}

		data2 := bytes.Repeat([]byte("another layer "), 10_000)
		d2 := digest.FromBytes(data2)
		hooked := storage.New(hookDriver{s.Driver(), func() { gc("between the upload's completion and its move") }})
		w2, err := hooked.CreateBlob(ctx, d2, int64(len(data2)))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w2.Write(data2)
		if err := w2.Commit(ctx); err != nil {
			t.Fatalf("commit after gc: %v", err)
		}
		if _, err := s.StatBlob(ctx, d2); err != nil {
			t.Fatalf("blob not cached: %v", err)
		}
		assertNoUploads(t, s)
	})
}

// A marker that stopped beating (the fill died) goes, with its upload.
func TestGCCollectsADeadFillsUpload(t *testing.T) {
	dir := t.TempDir()
	s := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	ctx := t.Context()
	w, err := s.CreateBlob(ctx, digest.FromString("x"), 1)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write([]byte("x"))
	// The process died UploadLiveFor ago: its files stopped changing.
	entries, _ := os.ReadDir(filepath.Join(dir, "_uploads"))
	old := time.Now().Add(-storage.UploadLiveFor - time.Minute)
	for _, e := range entries {
		if err := os.Chtimes(filepath.Join(dir, "_uploads", e.Name()), old, old); err != nil {
			t.Fatal(err)
		}
	}
	if len(entries) != 2 {
		t.Fatalf("uploads dir holds %d entries, want the upload and its marker", len(entries))
	}
	if res, err := s.GC(ctx, time.Minute, false); err != nil || res.Uploads != 1 {
		t.Fatalf("gc: %+v, %v; want the dead fill's upload removed", res, err)
	}
	if left, _ := os.ReadDir(filepath.Join(dir, "_uploads")); len(left) != 0 {
		t.Fatalf("left after gc: %v", left)
	}
	_ = w.Cancel(ctx)
}

// TestCheckSkipsContentRemovedMeanwhile: fsck runs while the mirror serves;
// a blob that gc or eviction removes after fsck listed it is not damage.
func TestCheckSkipsContentRemovedMeanwhile(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		var all []digest.Digest
		for i := range 4 {
			all = append(all, putBlob(t, s, []byte{'b', byte(i)}))
		}
		removed := false
		res, err := s.Check(ctx, storage.ReportOnly, func(o, to, b, tb int64) {
			if removed {
				return
			}
			removed = true
			for _, d := range all { // whatever is left to check goes now
				_ = s.Driver().Delete(ctx, blobPath(d))
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		if !removed || len(res.Damaged) != 0 {
			t.Fatalf("damage reported for removed blobs: %+v", res.Damaged)
		}
	})
}

// TestLocationNamesTheStore (U1 F6): fsck and gc name what they checked:
// the directory, or the bucket and prefix on S3 (not the spool directory).
func TestLocationNamesTheStore(t *testing.T) {
	dir := t.TempDir()
	fs, err := storage.Open(t.Context(), storage.Options{Driver: "filesystem", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if got := fs.Location(); got != dir {
		t.Errorf("filesystem location %q, want %q", got, dir)
	}
	o := testsupport.StartS3(t)
	o.Prefix = "mirror/cache"
	if got, want := testsupport.OpenS3(t, o).Location(), "s3://"+o.Bucket+"/mirror/cache"; got != want {
		t.Errorf("s3 location %q, want %q", got, want)
	}
}

// TestPurgeUploadsCounts: PurgeUploads removes every upload (markers
// included) and counts the uploads, not their markers, for the start-up
// log; with no uploads directory it is 0.
func TestPurgeUploadsCounts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	ctx := t.Context()
	if n, err := s.PurgeUploads(ctx); err != nil || n != 0 {
		t.Fatalf("no uploads: %d, %v", n, err)
	}
	for _, b := range []string{"a", "b"} {
		w, err := s.CreateBlob(ctx, digest.FromString(b), 1)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write([]byte(b)) // never committed: a crash
	}
	if n, err := s.PurgeUploads(ctx); err != nil || n != 2 {
		t.Fatalf("two interrupted uploads: %d, %v; want 2", n, err)
	}
	if left, _ := os.ReadDir(filepath.Join(dir, "_uploads")); len(left) != 0 {
		t.Fatalf("left after PurgeUploads: %v", left)
	}
}
