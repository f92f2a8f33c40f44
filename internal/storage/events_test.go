package storage_test

import (
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// TestEventsAndRemoval: the store reports new content once (not a second
// commit of the same blob), and removals by RemoveBlob, RemoveManifest and
// GC; Usage goes down with them; Objects lists what is cached; removing
// content that is not there is ErrNotFound.
func TestEventsAndRemoval(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		var mu sync.Mutex
		var evs []storage.Event
		s.Notify(func(ev storage.Event) {
			mu.Lock()
			evs = append(evs, ev)
			mu.Unlock()
		})
		a := putBlob(t, s, []byte("blob a"))
		putBlob(t, s, []byte("blob a")) // already cached: no event
		b := putBlob(t, s, []byte("blob bb"))
		orphan := putBlob(t, s, []byte("orphan!!"))
		body := []byte(`{"schemaVersion":2,"layers":[{"digest":"` + a.String() + `","size":6},{"digest":"` + b.String() + `","size":7}]}`)
		md := digest.FromBytes(body)
		if err := s.PutManifest(ctx, "application/vnd.oci.image.manifest.v1+json", md, body); err != nil {
			t.Fatal(err)
		}
		objs, err := s.Objects(ctx)
		if err != nil || len(objs) != 4 {
			t.Fatalf("Objects = %+v, %v; want 4", objs, err)
		}
		if n, err := s.RemoveBlob(ctx, b); err != nil || n != 7 {
			t.Fatalf("RemoveBlob = %d, %v", n, err)
		}
		if _, err := s.RemoveBlob(ctx, b); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("RemoveBlob of a removed blob: %v", err)
		}
		if _, err := s.StatBlob(ctx, b); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("removed blob still there: %v", err)
		}
		if res, err := s.GC(ctx, 0, false); err != nil || res.Blobs != 1 {
			t.Fatalf("gc: %+v, %v", res, err)
		}
		mlen := int64(len("application/vnd.oci.image.manifest.v1+json\n") + len(body))
		if n, err := s.RemoveManifest(ctx, md); err != nil || n != mlen {
			t.Fatalf("RemoveManifest = %d, %v; want %d", n, err, mlen)
		}
		if bytes, objects := s.Usage("blob"); bytes != 6 || objects != 1 {
			t.Errorf("blob usage %d bytes, %d objects; want 6, 1", bytes, objects)
		}
		if bytes, objects := s.Usage("manifest"); bytes != 0 || objects != 0 {
			t.Errorf("manifest usage %d bytes, %d objects; want none", bytes, objects)
		}
		want := []storage.Event{
			{Kind: "blob", Digest: a, Size: 6},
			{Kind: "blob", Digest: b, Size: 7},
			{Kind: "blob", Digest: orphan, Size: 8},
			{Kind: "manifest", Digest: md, Size: mlen},
			{Kind: "blob", Digest: b, Size: 7, Removed: true},
			{Kind: "blob", Digest: orphan, Size: 8, Removed: true},
			{Kind: "manifest", Digest: md, Size: mlen, Removed: true},
		}
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(evs, want) {
			t.Fatalf("events\n%+v\nwant\n%+v", evs, want)
		}
	})
}

// TestUsageAfterRemovalBehindTheStore: content that another process removed
// (mirror fsck --repair, mirror gc from the CLI, an operator) and that is
// then cached again counts once in Usage, not twice
// (ngc_mirror_storage_used_bytes kept growing by the refetched bytes).
func TestUsageAfterRemovalBehindTheStore(t *testing.T) {
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := t.Context()
		d := putBlob(t, s, []byte("blob a"))
		body := []byte(`{"schemaVersion":2}`)
		md := digest.FromBytes(body)
		const mt = "application/vnd.oci.image.manifest.v1+json"
		if err := s.PutManifest(ctx, mt, md, body); err != nil {
			t.Fatal(err)
		}
		// Removed through the driver, as another process's Store would.
		for _, p := range []storage.PathSpec{storage.BlobPath{Digest: d}, storage.ManifestPath{Digest: md}} {
			path, err := storage.Path(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Driver().Delete(ctx, path); err != nil {
				t.Fatal(err)
			}
		}
		putBlob(t, s, []byte("blob a"))
		if err := s.PutManifest(ctx, mt, md, body); err != nil {
			t.Fatal(err)
		}
		if bytes, objects := s.Usage("blob"); bytes != 6 || objects != 1 {
			t.Errorf("blob usage %d bytes, %d objects; want 6, 1", bytes, objects)
		}
		mlen := int64(len(mt) + 1 + len(body))
		if bytes, objects := s.Usage("manifest"); bytes != mlen || objects != 1 {
			t.Errorf("manifest usage %d bytes, %d objects; want %d, 1", bytes, objects, mlen)
		}
		if _, err := s.RemoveBlob(ctx, d); err != nil {
			t.Fatal(err)
		}
		if bytes, objects := s.Usage("blob"); bytes != 0 || objects != 0 {
			t.Errorf("blob usage after RemoveBlob %d bytes, %d objects; want none", bytes, objects)
		}
	})
}
