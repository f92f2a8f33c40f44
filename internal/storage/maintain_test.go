package storage_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
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
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
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
		dmg, err := s.Check(ctx, storage.ReportOnly, func(o, to, b, tb int64) { calls = o })
		if err != nil {
			t.Fatal(err)
		}
		if len(dmg) != 2 || calls != 3 {
			t.Fatalf("report: %d damaged (%+v), progress to %d objects; want 2 of 3", len(dmg), dmg, calls)
		}
		if _, err := s.StatBlob(ctx, bad); err != nil {
			t.Fatal("report-only removed the blob")
		}
		if dmg, _ = s.Check(ctx, storage.Quarantine, nil); len(dmg) != 2 {
			t.Fatalf("quarantine: %d damaged", len(dmg))
		}
		if _, err := s.StatBlob(ctx, bad); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("quarantined blob still in the cache: %v", err)
		}
		if files(t, s.Driver(), pathOf(t, storage.QuarantineRoot{})) == nil {
			t.Fatal("nothing under /_quarantine")
		}
		if dmg, _ = s.Check(ctx, storage.Delete, nil); len(dmg) != 0 {
			t.Fatalf("after quarantine: %d damaged", len(dmg))
		}
		if _, err := s.StatBlob(ctx, good); err != nil {
			t.Fatalf("sound blob gone: %v", err)
		}
	})
}

// TestGCRemovesUnreferencedBlobs: blobs no manifest refers to are removed
// once older than the grace period, referenced and young ones are kept.
func TestGCRemovesUnreferencedBlobs(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
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
		if err != nil || res.Blobs != 1 {
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
		// A stale upload goes too, where the store shows it (S3 keeps an
		// unfinished multipart upload out of the bucket's listing: a bucket
		// lifecycle rule aborts those).
		w, err := s.CreateBlob(ctx, digest.FromString("x"), 1)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write([]byte("x"))
		visible := len(files(t, s.Driver(), pathOf(t, storage.UploadsPath{})))
		if res, err = s.GC(ctx, 0, false); err != nil || res.Uploads != visible {
			t.Fatalf("stale upload (%d visible): %+v, %v", visible, res, err)
		}
		if visible > 0 && len(files(t, s.Driver(), pathOf(t, storage.UploadsPath{}))) != 0 {
			t.Fatal("stale upload still there")
		}
		_ = w.Cancel(context.Background())
	})
}

// TestCheckSkipsContentRemovedMeanwhile: fsck runs while the mirror serves;
// a blob that gc or eviction removes after fsck listed it is not damage.
func TestCheckSkipsContentRemovedMeanwhile(t *testing.T) {
	forEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		var all []digest.Digest
		for i := range 4 {
			all = append(all, putBlob(t, s, []byte{'b', byte(i)}))
		}
		removed := false
		dmg, err := s.Check(ctx, storage.ReportOnly, func(o, to, b, tb int64) {
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
		if !removed || len(dmg) != 0 {
			t.Fatalf("damage reported for removed blobs: %+v", dmg)
		}
	})
}
