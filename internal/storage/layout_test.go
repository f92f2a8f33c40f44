package storage_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// A cache of layout 1 (tag records and links under /repositories/<name>,
// no version file: the literal paths of the code before layouts were
// versioned) is migrated at start: its tags and links are read back under
// the registry it served; a second start finds layout 2 and moves nothing.
func TestEnsureLayoutMigratesV1(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		d := s.Driver()
		dgst := digest.FromString("a manifest")
		blob := digest.FromString("a layer")
		rec := `{"digest":"` + dgst.String() + `","mediaType":"application/vnd.oci.image.manifest.v1+json","size":10,"confirmedAt":"2025-01-02T03:04:05Z"}`
		for p, content := range map[string]string{
			"/repositories/nvidia/pytorch/_tags/24.05-py3":                                  rec,
			"/repositories/org/team/image/_tags/1.0":                                        rec,
			"/repositories/org/team/image/_taglist":                                         `{"tags":["1.0"],"complete":true,"confirmedAt":"2025-01-02T03:04:05Z"}`,
			"/repositories/nvidia/pytorch/_links/sha256/" + blob.Encoded():                  "",
			"/repositories/nvidia/pytorch/_links/sha256/" + dgst.Encoded():                  "",
			"/repositories/nvidia/pytorch/_tags/x.aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee.tmp": "cut off",
		} {
			if err := d.PutContent(ctx, p, []byte(content)); err != nil {
				t.Fatal(err)
			}
		}
		res, err := s.EnsureLayout(ctx, "nvcr.io", nil)
		if err != nil || res.Found != 1 || res.Migrated != 5 {
			t.Fatalf("EnsureLayout = %+v, %v; want found 1, 5 migrated", res, err)
		}
		pt := storage.Repo{Registry: "nvcr.io", Name: "nvidia/pytorch"}
		got, err := s.GetTag(ctx, pt, "24.05-py3")
		if err != nil || got.Digest != dgst || !got.ConfirmedAt.Equal(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)) {
			t.Fatalf("migrated tag = %+v, %v", got, err)
		}
		if tags, err := s.ListTags(ctx, storage.Repo{Registry: "nvcr.io", Name: "org/team/image"}); err != nil || len(tags) != 1 || tags[0] != "1.0" {
			t.Fatalf("migrated tags of org/team/image = %v, %v", tags, err)
		}
		if tl, err := s.GetTagList(ctx, storage.Repo{Registry: "nvcr.io", Name: "org/team/image"}); err != nil || len(tl.Tags) != 1 || !tl.Complete {
			t.Fatalf("migrated tag list = %+v, %v", tl, err)
		}
		for _, l := range []digest.Digest{blob, dgst} {
			if ok, err := s.HasLink(ctx, pt, l); err != nil || !ok {
				t.Fatalf("migrated link %s: %v %v", l, ok, err)
			}
		}
		// Keyed by registry: another upstream does not see them.
		other := storage.Repo{Registry: "registry.example.com", Name: "nvidia/pytorch"}
		if _, err := s.GetTag(ctx, other, "24.05-py3"); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("another registry's tag: %v, want ErrNotFound", err)
		}
		if ok, _ := s.HasLink(ctx, other, blob); ok {
			t.Error("another registry's link")
		}
		if _, err := d.Stat(ctx, "/repositories"); err == nil {
			t.Error("/repositories left behind")
		}
		if res, err := s.EnsureLayout(ctx, "nvcr.io", nil); err != nil || res.Found != storage.LayoutVersion || res.Migrated != 0 {
			t.Errorf("second start: %+v, %v", res, err)
		}
	})
}

// A new cache gets the version record; a newer or unreadable one is refused.
func TestEnsureLayoutVersions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := storage.New(inmemory.New())
	if res, err := s.EnsureLayout(ctx, "nvcr.io", nil); err != nil || res.Found != 1 || res.Migrated != 0 {
		t.Fatalf("new cache: %+v, %v", res, err)
	}
	lp := pathOf(t, storage.LayoutPath{})
	if raw, err := s.Driver().GetContent(ctx, lp); err != nil || string(raw) != "{\"version\":2}\n" {
		t.Fatalf("layout record %q, %v", raw, err)
	}
	for _, raw := range []string{`{"version":3}`, `garbage`, `{"version":1}`} {
		if err := s.Driver().PutContent(ctx, lp, []byte(raw)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.EnsureLayout(ctx, "nvcr.io", nil); !errors.Is(err, storage.ErrLayout) {
			t.Errorf("layout record %s: %v, want ErrLayout", raw, err)
		}
	}
}

// Paths are built from typed specs; bad parts are errors, not odd paths.
func TestPaths(t *testing.T) {
	t.Parallel()
	d := digest.FromString("x")
	nv := storage.Repo{Registry: "nvcr.io", Name: "nvidia/pytorch"}
	for spec, want := range map[storage.PathSpec]string{
		storage.BlobPath{Digest: d}:                 "/blobs/sha256/" + d.Encoded()[:2] + "/" + d.Encoded(),
		storage.ManifestPath{Digest: d}:             "/manifests/sha256/" + d.Encoded()[:2] + "/" + d.Encoded(),
		storage.TagPath{Repo: nv, Tag: "24.05-py3"}: "/registries/nvcr.io/nvidia/pytorch/_tags/24.05-py3",
		storage.TagListPath{Repo: nv}:               "/registries/nvcr.io/nvidia/pytorch/_taglist",
		storage.LinkPath{Repo: nv, Digest: d}:       "/registries/nvcr.io/nvidia/pytorch/_links/sha256/" + d.Encoded(),
		storage.LayoutPath{}:                        "/_layout",
		storage.TagPath{Repo: storage.Repo{Registry: "127.0.0.1:5000", Name: "x"}, Tag: "1"}: "/registries/127.0.0.1_5000/x/_tags/1",
		storage.HealthPath{}:                     "/_health/probe",
		storage.UploadsPath{}:                    "/_uploads",
		storage.UploadMarkerPath{ID: "0123abcd"}: "/_uploads/0123abcd.live",
		storage.QuarantinePath{Kind: storage.KindBlob, Digest: d, At: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}: "/_quarantine/blob/sha256/" + d.Encoded() + ".20250102T030405Z",
	} {
		if got, err := storage.Path(spec); err != nil || got != want {
			t.Errorf("Path(%#v) = %q, %v; want %q", spec, got, err, want)
		}
	}
	for _, spec := range []storage.PathSpec{
		storage.BlobPath{Digest: "sha256:zz"},
		storage.TagPath{Repo: nv, Tag: "../x"},
		storage.TagPath{Repo: storage.Repo{Registry: "nvcr.io", Name: "../etc"}, Tag: "x"},
		storage.TagPath{Repo: storage.Repo{Registry: "a/b", Name: "x"}, Tag: "x"},
		storage.TagPath{Repo: storage.Repo{Registry: "", Name: "x"}, Tag: "x"},
		storage.UploadPath{ID: "../x"},
	} {
		if p, err := storage.Path(spec); err == nil {
			t.Errorf("Path(%#v) = %q, want an error", spec, p)
		}
	}
}

// What a cache can do comes from Open, not from the driver's name.
func TestCapabilities(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := storage.Open(context.Background(), storage.Options{Driver: "filesystem", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if c := s.Capabilities(); c.LocalDir != dir || !c.Exclusive || c.Redirect {
		t.Errorf("filesystem capabilities %+v", c)
	}
	if c := storage.New(inmemory.New()).Capabilities(); c != (storage.Capabilities{}) {
		t.Errorf("bare driver capabilities %+v", c)
	}
	if _, err := storage.Open(context.Background(), storage.Options{Driver: "floppy"}); err == nil {
		t.Error("an unknown driver opened")
	}
}
