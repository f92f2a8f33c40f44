package storage_test

import (
	"bytes"
	"context"
	_ "crypto/sha512" // make sha512 digests available
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// files lists every file (not directory) under root, sorted.
func files(t *testing.T, d driver.StorageDriver, root string) []string {
	t.Helper()
	var out []string
	err := d.Walk(context.Background(), root, func(fi driver.FileInfo) error {
		if !fi.IsDir() {
			out = append(out, fi.Path())
		}
		return nil
	})
	if err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
		t.Fatalf("walking %s: %v", root, err)
	}
	sort.Strings(out)
	return out
}

// assertNoUploads checks that nothing is left under /_uploads, by List and
// by Walk.
func assertNoUploads(t *testing.T, s *storage.Store) {
	t.Helper()
	entries, err := s.Driver().List(context.Background(), pathOf(t, storage.UploadsPath{}))
	if err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
		t.Fatalf("listing /_uploads: %v", err)
	}
	if len(entries) != 0 {
		t.Errorf("/_uploads holds %v", entries)
	}
	if f := files(t, s.Driver(), pathOf(t, storage.UploadsPath{})); len(f) != 0 {
		t.Errorf("files left under /_uploads: %v", f)
	}
}

// assertEmpty checks that the driver holds no file at all.
func assertEmpty(t *testing.T, s *storage.Store) {
	t.Helper()
	if f := files(t, s.Driver(), "/"); len(f) != 0 {
		t.Errorf("files left in storage: %v", f)
	}
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeBlob writes data in uneven chunks and returns the writer, not
// committed.
func writeBlob(t *testing.T, s *storage.Store, dgst digest.Digest, size int64, data []byte) *storage.BlobWriter {
	t.Helper()
	w, err := s.CreateBlob(context.Background(), dgst, size)
	if err != nil {
		t.Fatalf("CreateBlob: %v", err)
	}
	for rest, chunk := data, 1; len(rest) > 0; chunk = chunk*3 + 1 {
		n := min(chunk, len(rest))
		if got, err := w.Write(rest[:n]); err != nil || got != n {
			t.Fatalf("Write: %d, %v", got, err)
		}
		rest = rest[n:]
	}
	if w.Size() != int64(len(data)) {
		t.Fatalf("Size() = %d after writing %d bytes", w.Size(), len(data))
	}
	return w
}

func readBlob(t *testing.T, s *storage.Store, dgst digest.Digest, offset int64) []byte {
	t.Helper()
	rc, err := s.OpenBlob(context.Background(), dgst, offset)
	if err != nil {
		t.Fatalf("OpenBlob(%s, %d): %v", dgst, offset, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading blob: %v", err)
	}
	return b
}

func TestBlobCommit(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		data := randomBytes(1, 100_000)
		dgst := digest.FromBytes(data)

		if _, err := s.StatBlob(ctx, dgst); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("StatBlob before commit: %v, want ErrNotFound", err)
		}
		w := writeBlob(t, s, dgst, int64(len(data)), data)
		// Not visible before Commit.
		if _, err := s.StatBlob(ctx, dgst); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("StatBlob before Commit: %v, want ErrNotFound", err)
		}
		if err := w.Commit(ctx); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		size, err := s.StatBlob(ctx, dgst)
		if err != nil || size != int64(len(data)) {
			t.Fatalf("StatBlob = %d, %v; want %d", size, err, len(data))
		}
		if got := readBlob(t, s, dgst, 0); !bytes.Equal(got, data) {
			t.Fatalf("blob bytes differ (got %d bytes)", len(got))
		}
		assertNoUploads(t, s)
		blobFiles := files(t, s.Driver(), "/")
		if len(blobFiles) != 1 || !strings.HasPrefix(blobFiles[0], pathOf(t, storage.ContentRoot{Kind: storage.KindBlob})+"/") || path.Base(blobFiles[0]) != dgst.Encoded() {
			t.Errorf("storage holds %v, want one file under /blobs named %s", blobFiles, dgst.Encoded())
		}

		// Finished writers: Cancel is a no-op, a second Commit fails.
		if err := w.Cancel(ctx); err != nil {
			t.Errorf("Cancel after Commit: %v", err)
		}
		if err := w.Commit(ctx); err == nil {
			t.Errorf("second Commit succeeded")
		}
		if size, err := s.StatBlob(ctx, dgst); err != nil || size != int64(len(data)) {
			t.Errorf("after Cancel-after-Commit: StatBlob = %d, %v", size, err)
		}

		// Committing the same content again (a second fill) is harmless.
		w2 := writeBlob(t, s, dgst, -1, data)
		if err := w2.Commit(ctx); err != nil {
			t.Fatalf("re-Commit with unknown size: %v", err)
		}
		if got := readBlob(t, s, dgst, 0); !bytes.Equal(got, data) {
			t.Fatalf("blob bytes differ after a second commit")
		}
		assertNoUploads(t, s)
	})
}

func TestBlobEmpty(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		w := writeBlob(t, s, digest.FromBytes(nil), 0, nil)
		if err := w.Commit(ctx); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		if size, err := s.StatBlob(ctx, digest.FromBytes(nil)); err != nil || size != 0 {
			t.Fatalf("StatBlob = %d, %v", size, err)
		}
		if got := readBlob(t, s, digest.FromBytes(nil), 0); len(got) != 0 {
			t.Fatalf("empty blob read %d bytes", len(got))
		}
	})
}

func TestOpenBlobAtOffset(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		data := randomBytes(2, 10_000)
		dgst := digest.FromBytes(data)
		if err := writeBlob(t, s, dgst, int64(len(data)), data).Commit(ctx); err != nil {
			t.Fatal(err)
		}
		for _, off := range []int64{0, 1, 4095, 4096, 5000, int64(len(data)) - 1, int64(len(data))} {
			if got := readBlob(t, s, dgst, off); !bytes.Equal(got, data[off:]) {
				t.Errorf("OpenBlob at %d: got %d bytes, want %d (or content differs)", off, len(got), len(data)-int(off))
			}
		}
	})
}

func TestBlobNotFoundAndBadDigests(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		missing := digest.FromString("not cached")
		if _, err := s.StatBlob(ctx, missing); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("StatBlob(missing): %v, want ErrNotFound", err)
		}
		if _, err := s.OpenBlob(ctx, missing, 0); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("OpenBlob(missing): %v, want ErrNotFound", err)
		}
		for _, bad := range []digest.Digest{
			"sha256:xyz",
			"sha256:" + digest.Digest(strings.Repeat("a", 63)),
			"md5:d41d8cd98f00b204e9800998ecf8427e",
			"",
			"sha256:../../../etc/passwd",
		} {
			if _, err := s.CreateBlob(ctx, bad, 1); !errors.Is(err, storage.ErrUnsupportedDigest) {
				t.Errorf("CreateBlob(%q): %v, want ErrUnsupportedDigest", bad, err)
			}
			if _, err := s.StatBlob(ctx, bad); !errors.Is(err, storage.ErrUnsupportedDigest) {
				t.Errorf("StatBlob(%q): %v, want ErrUnsupportedDigest", bad, err)
			}
			if _, err := s.OpenBlob(ctx, bad, 0); !errors.Is(err, storage.ErrUnsupportedDigest) {
				t.Errorf("OpenBlob(%q): %v, want ErrUnsupportedDigest", bad, err)
			}
			if _, err := s.GetManifest(ctx, bad); !errors.Is(err, storage.ErrUnsupportedDigest) {
				t.Errorf("GetManifest(%q): %v, want ErrUnsupportedDigest", bad, err)
			}
		}
		assertEmpty(t, s)
	})
}

func TestBlobCommitRejectsWrongContent(t *testing.T) {
	t.Parallel()
	data := randomBytes(3, 50_000)
	good := digest.FromBytes(data)
	tests := []struct {
		name    string
		dgst    digest.Digest
		size    int64
		wantErr error
	}{
		{"wrong digest", digest.FromString("something else"), int64(len(data)), storage.ErrDigestMismatch},
		{"wrong digest, unknown size", digest.FromString("something else"), -1, storage.ErrDigestMismatch},
		{"wrong algorithm", digest.SHA512.FromBytes(data[1:]), int64(len(data)), storage.ErrDigestMismatch},
		{"too short", good, int64(len(data)) + 1, storage.ErrSizeMismatch},
		{"too long", good, int64(len(data)) - 1, storage.ErrSizeMismatch},
		{"zero size expected", good, 0, storage.ErrSizeMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
				ctx := context.Background()
				w := writeBlob(t, s, tc.dgst, tc.size, data)
				err := w.Commit(ctx)
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Commit: %v, want %v", err, tc.wantErr)
				}
				for _, d := range []digest.Digest{tc.dgst, good} {
					if _, err := s.StatBlob(ctx, d); !errors.Is(err, storage.ErrNotFound) {
						t.Errorf("StatBlob(%s) after a failed Commit: %v, want ErrNotFound", d, err)
					}
				}
				assertNoUploads(t, s)
				assertEmpty(t, s)
				if err := w.Cancel(ctx); err != nil {
					t.Errorf("Cancel after a failed Commit: %v", err)
				}
				if err := w.Commit(ctx); err == nil {
					t.Errorf("Commit after a failed Commit succeeded")
				}
			})
		})
	}
}

func TestBlobCancel(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		data := randomBytes(4, 30_000)
		dgst := digest.FromBytes(data)
		w := writeBlob(t, s, dgst, int64(len(data)), data)
		if err := w.Cancel(ctx); err != nil {
			t.Fatalf("Cancel: %v", err)
		}
		assertNoUploads(t, s)
		assertEmpty(t, s)
		if err := w.Commit(ctx); err == nil {
			t.Fatal("Commit after Cancel succeeded")
		}
		if _, err := s.StatBlob(ctx, dgst); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("StatBlob after Cancel: %v, want ErrNotFound", err)
		}
		assertEmpty(t, s)
		if err := w.Cancel(ctx); err != nil {
			t.Errorf("second Cancel: %v", err)
		}
	})
}

const ociManifest = `{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
  "layers": []
}
`

func TestManifestRoundTrip(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		cases := []struct {
			mediaType string
			body      []byte
			dgst      digest.Digest
		}{
			// Pretty-printed, with newlines and a trailing newline: the
			// exact bytes must survive.
			{"application/vnd.oci.image.manifest.v1+json", []byte(ociManifest), digest.FromString(ociManifest)},
			{"application/vnd.docker.distribution.manifest.list.v2+json", []byte(`{"schemaVersion":2,"manifests":[]}`), ""},
			{"application/vnd.oci.image.index.v1+json", []byte("\n\n{}\n"), ""},
			{"", []byte(`{"schemaVersion":2}`), ""},
			{"application/vnd.oci.image.manifest.v1+json; charset=utf-8", []byte(`{"sha512":true}`), digest.SHA512.FromString(`{"sha512":true}`)},
		}
		for i := range cases {
			if cases[i].dgst == "" {
				cases[i].dgst = digest.FromBytes(cases[i].body)
			}
		}
		for _, c := range cases {
			if _, err := s.GetManifest(ctx, c.dgst); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("GetManifest before Put: %v, want ErrNotFound", err)
			}
			if err := s.PutManifest(ctx, c.mediaType, c.dgst, c.body); err != nil {
				t.Fatalf("PutManifest(%q): %v", c.mediaType, err)
			}
		}
		for _, c := range cases {
			m, err := s.GetManifest(ctx, c.dgst)
			if err != nil {
				t.Fatalf("GetManifest(%s): %v", c.dgst, err)
			}
			if m.MediaType != c.mediaType || m.Digest != c.dgst || !bytes.Equal(m.Body, c.body) {
				t.Errorf("GetManifest(%s) = {%q %s %q}, want {%q %s %q}", c.dgst, m.MediaType, m.Digest, m.Body, c.mediaType, c.dgst, c.body)
			}
		}
		// Manifests do not show up as blobs.
		if _, err := s.StatBlob(ctx, cases[0].dgst); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("StatBlob of a manifest digest: %v, want ErrNotFound", err)
		}
	})
}

func TestPutManifestRefusesBadInput(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		body := []byte(ociManifest)
		dgst := digest.FromBytes(body)
		other := []byte(strings.Replace(ociManifest, `"layers": []`, `"layers": [{}]`, 1))

		if err := s.PutManifest(ctx, "application/vnd.oci.image.manifest.v1+json", dgst, other); !errors.Is(err, storage.ErrDigestMismatch) {
			t.Errorf("PutManifest with a body not matching the digest: %v, want ErrDigestMismatch", err)
		}
		if err := s.PutManifest(ctx, "application/json", digest.SHA512.FromBytes(other), body); !errors.Is(err, storage.ErrDigestMismatch) {
			t.Errorf("PutManifest sha512 mismatch: %v, want ErrDigestMismatch", err)
		}
		if err := s.PutManifest(ctx, "application/json", "sha256:nothex", body); !errors.Is(err, storage.ErrUnsupportedDigest) {
			t.Errorf("PutManifest with an invalid digest: %v, want ErrUnsupportedDigest", err)
		}
		for _, mt := range []string{"application/json\n", "a\r\nb", "\n"} {
			if err := s.PutManifest(ctx, mt, dgst, body); err == nil {
				t.Errorf("PutManifest accepted media type %q", mt)
			}
		}
		if _, err := s.GetManifest(ctx, dgst); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("GetManifest after refused Puts: %v, want ErrNotFound", err)
		}
		assertEmpty(t, s)
	})
}

func TestGetManifestDetectsTampering(t *testing.T) {
	t.Parallel()
	body := []byte(ociManifest)
	mt := "application/vnd.oci.image.manifest.v1+json"
	tests := []struct {
		name   string
		record func(raw []byte) []byte
	}{
		{"flipped byte", func(raw []byte) []byte {
			out := bytes.Clone(raw)
			out[len(out)-5] ^= 0x20
			return out
		}},
		{"truncated", func(raw []byte) []byte { return raw[:len(raw)-2] }},
		{"appended", func(raw []byte) []byte { return append(bytes.Clone(raw), ' ') }},
		{"no media type line", func([]byte) []byte { return []byte(`{"schemaVersion":2}`) }},
		{"media type swallowed body start", func(raw []byte) []byte {
			return bytes.Replace(raw, []byte("json\n{"), []byte("json{\n"), 1)
		}},
		{"empty", func([]byte) []byte { return nil }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
				ctx := context.Background()
				dgst := digest.FromBytes(body)
				if err := s.PutManifest(ctx, mt, dgst, body); err != nil {
					t.Fatal(err)
				}
				stored := files(t, s.Driver(), "/")
				if len(stored) != 1 || !strings.HasPrefix(stored[0], pathOf(t, storage.ContentRoot{Kind: storage.KindManifest})+"/") {
					t.Fatalf("storage holds %v, want one file under /manifests", stored)
				}
				raw, err := s.Driver().GetContent(ctx, stored[0])
				if err != nil {
					t.Fatal(err)
				}
				if want := mt + "\n" + ociManifest; string(raw) != want {
					t.Fatalf("stored record %q, want %q", raw, want)
				}
				if err := s.Driver().PutContent(ctx, stored[0], tc.record(raw)); err != nil {
					t.Fatal(err)
				}
				if m, err := s.GetManifest(ctx, dgst); !errors.Is(err, storage.ErrDigestMismatch) {
					t.Fatalf("GetManifest of a tampered record: %+v, %v; want ErrDigestMismatch", m, err)
				}
			})
		})
	}
}

func TestTags(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		const repo = "nvidia/tritonserver/base" // three levels
		confirmed := time.Date(2025, 2, 3, 4, 5, 6, 789_000_000, time.UTC)
		recs := map[string]storage.TagRecord{}
		tags := []string{"24.01-py3", "v1.2.3", "1.0", "1.0.0", "latest", "12.4.1-devel-ubuntu22.04", "a.b.c.d", "_under", "X.Y"}
		for i, tag := range tags {
			body := "manifest for " + tag
			recs[tag] = storage.TagRecord{
				Digest:      digest.FromString(body),
				MediaType:   "application/vnd.oci.image.index.v1+json",
				Size:        int64(len(body)),
				ConfirmedAt: confirmed.Add(time.Duration(i) * time.Minute),
			}
		}

		if _, err := s.ListTags(ctx, nv(repo)); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("ListTags of an unknown repository: %v, want ErrNotFound", err)
		}
		if _, err := s.GetTag(ctx, nv(repo), "latest"); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("GetTag of an unknown tag: %v, want ErrNotFound", err)
		}
		for _, tag := range tags {
			if err := s.PutTag(ctx, nv(repo), tag, recs[tag]); err != nil {
				t.Fatalf("PutTag(%s): %v", tag, err)
			}
		}
		// Neighbouring repositories: a prefix and a child.
		parentRec := storage.TagRecord{Digest: digest.FromString("parent"), MediaType: "m", Size: 6, ConfirmedAt: confirmed}
		if err := s.PutTag(ctx, nv("nvidia/tritonserver"), "parent-only", parentRec); err != nil {
			t.Fatal(err)
		}
		if err := s.PutTag(ctx, nv(repo+"/child"), "child-only", parentRec); err != nil {
			t.Fatal(err)
		}

		for _, tag := range tags {
			got, err := s.GetTag(ctx, nv(repo), tag)
			if err != nil {
				t.Fatalf("GetTag(%s): %v", tag, err)
			}
			want := recs[tag]
			if got.Digest != want.Digest || got.MediaType != want.MediaType || got.Size != want.Size || !got.ConfirmedAt.Equal(want.ConfirmedAt) {
				t.Errorf("GetTag(%s) = %+v, want %+v", tag, got, want)
			}
		}
		wantList := append([]string(nil), tags...)
		sort.Strings(wantList)
		list, err := s.ListTags(ctx, nv(repo))
		if err != nil || !reflect.DeepEqual(list, wantList) {
			t.Fatalf("ListTags = %v, %v; want %v", list, err, wantList)
		}
		if list, err := s.ListTags(ctx, nv("nvidia/tritonserver")); err != nil || !reflect.DeepEqual(list, []string{"parent-only"}) {
			t.Errorf("ListTags(parent) = %v, %v", list, err)
		}
		if list, err := s.ListTags(ctx, nv(repo+"/child")); err != nil || !reflect.DeepEqual(list, []string{"child-only"}) {
			t.Errorf("ListTags(child) = %v, %v", list, err)
		}
		if _, err := s.ListTags(ctx, nv("nvidia")); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("ListTags(nvidia) with no tags of its own: %v, want ErrNotFound", err)
		}
		if _, err := s.GetTag(ctx, nv("nvidia/tritonserver"), "latest"); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("a tag leaked to the parent repository: %v", err)
		}

		// Overwrite.
		newer := recs["latest"]
		newer.Digest = digest.FromString("newer")
		newer.ConfirmedAt = newer.ConfirmedAt.Add(time.Hour)
		if err := s.PutTag(ctx, nv(repo), "latest", newer); err != nil {
			t.Fatal(err)
		}
		if got, err := s.GetTag(ctx, nv(repo), "latest"); err != nil || got.Digest != newer.Digest || !got.ConfirmedAt.Equal(newer.ConfirmedAt) {
			t.Errorf("GetTag after overwrite = %+v, %v; want %+v", got, err, newer)
		}

		// Delete.
		if err := s.DeleteTag(ctx, nv(repo), "1.0"); err != nil {
			t.Fatalf("DeleteTag: %v", err)
		}
		if _, err := s.GetTag(ctx, nv(repo), "1.0"); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("GetTag after DeleteTag: %v, want ErrNotFound", err)
		}
		if got, err := s.GetTag(ctx, nv(repo), "1.0.0"); err != nil || got.Digest != recs["1.0.0"].Digest {
			t.Errorf("deleting 1.0 disturbed 1.0.0: %+v, %v", got, err)
		}
		list, err = s.ListTags(ctx, nv(repo))
		wantList = slices.DeleteFunc(wantList, func(s string) bool { return s == "1.0" })
		if err != nil || !reflect.DeepEqual(list, wantList) {
			t.Errorf("ListTags after DeleteTag = %v, %v; want %v", list, err, wantList)
		}
		for _, c := range [][2]string{{repo, "1.0"}, {repo, "never"}, {"no/such/repo", "x"}} {
			if err := s.DeleteTag(ctx, nv(c[0]), c[1]); err != nil {
				t.Errorf("DeleteTag(%s:%s) of an unknown tag: %v", c[0], c[1], err)
			}
		}
	})
}

func TestTagsDamagedAndPending(t *testing.T) {
	t.Parallel()
	testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
		ctx := context.Background()
		const repo = "org/team/image"
		rec := storage.TagRecord{Digest: digest.FromString("m"), MediaType: "application/json", Size: 1, ConfirmedAt: time.Unix(1, 0).UTC()}
		if err := s.PutTag(ctx, nv(repo), "good", rec); err != nil {
			t.Fatal(err)
		}
		tagFiles := files(t, s.Driver(), pathOf(t, storage.RegistriesPath{}))
		if len(tagFiles) != 1 {
			t.Fatalf("tag files %v, want 1", tagFiles)
		}
		dir := path.Dir(tagFiles[0])
		// A damaged record and one with an invalid digest read as missing.
		for name, raw := range map[string]string{
			"garbage":    "not json",
			"baddigest":  `{"digest":"sha256:zz","mediaType":"m","size":1}`,
			"nodigest":   `{"mediaType":"m","size":1}`,
			"emptyfile":  ``,
			"truncated":  `{"digest":"sha256:`,
			"wrongshape": `["sha256:0000"]`,
		} {
			if err := s.Driver().PutContent(ctx, path.Join(dir, name), []byte(raw)); err != nil {
				t.Fatal(err)
			}
			if got, err := s.GetTag(ctx, nv(repo), name); !errors.Is(err, storage.ErrNotFound) {
				t.Errorf("GetTag of damaged record %q = %+v, %v; want ErrNotFound", name, got, err)
			}
		}
		// A filesystem-driver PutContent in progress is not a tag.
		pending := path.Join(dir, "good.0f8fad5b-d9cb-469f-a165-70867728950e.tmp")
		if err := s.Driver().PutContent(ctx, pending, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		list, err := s.ListTags(ctx, nv(repo))
		if err != nil {
			t.Fatal(err)
		}
		for _, tag := range list {
			if strings.HasSuffix(tag, ".tmp") {
				t.Errorf("ListTags lists the pending write %q", tag)
			}
		}
		if !slices.Contains(list, "good") {
			t.Errorf("ListTags = %v, lacks good", list)
		}
	})
}

// TestLocalUploadReadableWhileWritten: with a local root, each Write is in
// the upload file when it returns, and a handle opened on it keeps reading
// after Commit renames it.
func TestLocalUploadReadableWhileWritten(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	data := []byte("hello, local upload")
	dgst := digest.FromBytes(data)
	w, err := s.CreateBlob(t.Context(), dgst, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if w.LocalPath() == "" {
		t.Fatal("no local path with a local root")
	}
	r, err := os.Open(w.LocalPath())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, _ = w.Write(data[:5])
	got := make([]byte, 5)
	if _, err := r.ReadAt(got, 0); err != nil || string(got) != "hello" {
		t.Fatalf("after the first write: %q, %v", got, err)
	}
	_, _ = w.Write(data[5:])
	if err := w.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	all := make([]byte, len(data))
	if _, err := r.ReadAt(all, 0); err != nil || string(all) != string(data) {
		t.Fatalf("after commit: %q, %v", all, err)
	}
	if size, err := s.StatBlob(t.Context(), dgst); err != nil || size != int64(len(data)) {
		t.Fatalf("StatBlob: %d, %v", size, err)
	}
}

// TestLocalUploadReservesSpace: on a local root, an upload larger than the
// free space fails at CreateBlob (so the mirror can serve it directly),
// not halfway through.
//
// The cache is a 1 MiB tmpfs of the test's own: reserving a TiB on the
// machine's disk filled it for a moment (ext4 allocates before it gives
// up), and tests running beside it failed with ENOSPC.
func TestLocalUploadReservesSpace(t *testing.T) {
	t.Parallel()
	dir := smallTmpfs(t, "1m")
	s := storage.New(filesystem.New(filesystem.DriverParameters{RootDirectory: dir, MaxThreads: 10}), storage.WithLocalRoot(dir))
	if _, err := s.CreateBlob(t.Context(), digest.FromString("huge"), 1<<30); err == nil {
		t.Fatal("an upload of 1 GiB into a 1 MiB filesystem was accepted")
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, filepath.FromSlash(pathOf(t, storage.UploadsPath{})))); len(entries) != 0 {
		t.Fatalf("a refused upload left %d files", len(entries))
	}
}

// smallTmpfs mounts a tmpfs of size (mount's "1m", "256k") on a directory
// of the test's own, unmounted at its end, to provoke ENOSPC; the test is
// skipped, saying so, where mount needs root.
func smallTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs to provoke ENOSPC (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
	return dir
}

// TestFullDiskLeavesNoTemporaryFiles: a write that fails on a full disk
// (ENOSPC at the final flush) leaves nothing behind. The filesystem
// driver's PutContent left an empty <name>.<uuid>.tmp for each: every
// /readyz probe of a full cache, every tag record, tag list, manifest and
// link a pull tried to write, kept after the disk had room again.
func TestFullDiskLeavesNoTemporaryFiles(t *testing.T) {
	t.Parallel()
	dir := smallTmpfs(t, "256k")
	s, err := storage.OpenFilesystem(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	rec := storage.TagRecord{Digest: digest.FromString("m"), MediaType: "application/json", Size: 1, ConfirmedAt: time.Unix(1, 0).UTC()}
	body := []byte(`{"schemaVersion":2}`)
	// Directories exist (as after earlier pulls), then the disk fills.
	if err := s.PutTag(ctx, nv("org/img"), "old", rec); err != nil {
		t.Fatal(err)
	}
	if err := s.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, make([]byte, 1<<20), 0o600); err == nil {
		t.Fatal("1 MiB fitted into a 256 KiB tmpfs")
	}
	for name, put := range map[string]func() error{
		"probe": func() error { return s.Probe(ctx) },
		"tag":   func() error { return s.PutTag(ctx, nv("org/img"), "new", rec) },
		"tag list": func() error {
			return s.PutTagList(ctx, nv("org/img"), storage.TagList{Tags: []string{"a"}, Complete: true})
		},
		"manifest": func() error { return s.PutManifest(ctx, "application/json", digest.FromBytes(body), body) },
	} {
		if err := put(); err == nil {
			t.Errorf("%s: written on a full disk", name)
		}
	}
	var left []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".tmp") {
			left = append(left, strings.TrimPrefix(p, dir))
		}
		return nil
	})
	if len(left) != 0 {
		t.Errorf("failed writes left %d temporary files: %v", len(left), left)
	}
	// Room again: the same writes work and are read back.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := s.Probe(ctx); err != nil {
		t.Fatalf("probe after the disk had room again: %v", err)
	}
	if err := s.PutTag(ctx, nv("org/img"), "new", rec); err != nil {
		t.Fatal(err)
	}
	if got, err := s.GetTag(ctx, nv("org/img"), "new"); err != nil || got != rec {
		t.Fatalf("GetTag = %+v, %v; want %+v", got, err, rec)
	}
	if err := s.PutManifest(ctx, "application/json", digest.FromBytes(body), body); err != nil {
		t.Fatal(err)
	}
	if m, err := s.GetManifest(ctx, digest.FromBytes(body)); err != nil || !bytes.Equal(m.Body, body) {
		t.Fatalf("GetManifest = %v, %v", m, err)
	}
}

// TestPurgeTemporary: at start-up the temporary files of writes that never
// ended (a crash, or a full disk before putContent) go, wherever they are
// outside /blobs; the content beside them stays.
func TestPurgeTemporary(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := storage.OpenFilesystem(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	rec := storage.TagRecord{Digest: digest.FromString("m"), MediaType: "application/json", Size: 1, ConfirmedAt: time.Unix(1, 0).UTC()}
	if err := s.PutTag(ctx, nv("org/img"), "t", rec); err != nil {
		t.Fatal(err)
	}
	const id = ".01a23d15-056f-79c4-aee4-ef4890e318a8.tmp"
	left := []string{"_health/probe" + id, "_layout" + id, "registries/nvcr.io/org/img/_tags/t" + id, "manifests/sha256/ab/abcd" + id}
	keep := []string{"registries/nvcr.io/org/img/_tags/t", "blobs/sha256/ab/abcd" + id, "registries/nvcr.io/org/img/_tags/t.tmp"}
	for _, p := range append(append([]string(nil), left...), keep[1:]...) {
		p = filepath.Join(dir, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	n, err := s.PurgeTemporary(ctx)
	if err != nil || n != len(left) {
		t.Fatalf("PurgeTemporary = %d, %v; want %d", n, err, len(left))
	}
	for _, p := range left {
		if _, err := os.Stat(filepath.Join(dir, filepath.FromSlash(p))); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v, want removed", p, err)
		}
	}
	for _, p := range keep {
		if _, err := os.Stat(filepath.Join(dir, filepath.FromSlash(p))); err != nil {
			t.Errorf("%s: %v, want kept", p, err)
		}
	}
	if got, err := s.GetTag(ctx, nv("org/img"), "t"); err != nil || got != rec {
		t.Errorf("GetTag after the purge = %+v, %v", got, err)
	}
}

// nv is repository name on nvcr.io, the key of tag records and links.
func nv(name string) storage.Repo { return storage.Repo{Registry: "nvcr.io", Name: name} }

// pathOf is the driver path of spec.
func pathOf(t *testing.T, spec storage.PathSpec) string {
	t.Helper()
	p, err := storage.Path(spec)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestBlobAppendAndHashApart: Append and Hash on two goroutines at once (as
// a cache fill does) commit the blob as Write would; bytes appended but not
// hashed, or hashed but not appended, fail the commit and leave nothing.
func TestBlobAppendAndHashApart(t *testing.T) {
	t.Parallel()
	data := randomBytes(7, 300_000)
	dgst := digest.FromBytes(data)
	tests := []struct {
		name       string
		hashUpTo   int // Hash gets data[:hashUpTo], Append all of data
		appendUpTo int
		wantErr    error
	}{
		{"both", len(data), len(data), nil},
		{"last chunk not hashed", len(data) - 1000, len(data), storage.ErrSizeMismatch},
		{"last chunk not written", len(data), len(data) - 1000, storage.ErrSizeMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testsupport.ForEachDriver(t, func(t *testing.T, s *storage.Store) {
				ctx := context.Background()
				w, err := s.CreateBlob(ctx, dgst, int64(len(data)))
				if err != nil {
					t.Fatal(err)
				}
				defer func() { _ = w.Cancel(ctx) }()
				chunks := make(chan []byte, 4)
				done := make(chan struct{})
				go func() { // the hash goroutine
					defer close(done)
					n := 0
					for c := range chunks {
						c = c[:min(len(c), max(tc.hashUpTo-n, 0))]
						w.Hash(c)
						n += len(c)
					}
				}()
				for off := 0; off < len(data); off += 1000 {
					c := data[off:min(off+1000, len(data))]
					if off < tc.appendUpTo {
						w.Append(c)
					}
					chunks <- c
				}
				close(chunks)
				<-done
				if w.StorageErr() != nil {
					t.Fatalf("StorageErr: %v", w.StorageErr())
				}
				err = w.Commit(ctx)
				if tc.wantErr == nil {
					if err != nil {
						t.Fatalf("Commit: %v", err)
					}
					if got := readBlob(t, s, dgst, 0); !bytes.Equal(got, data) {
						t.Fatalf("committed %d bytes, not the data", len(got))
					}
					return
				}
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Commit: %v, want %v", err, tc.wantErr)
				}
				assertNoUploads(t, s)
				if _, err := s.StatBlob(ctx, dgst); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("StatBlob after a failed Commit: %v, want ErrNotFound", err)
				}
			})
		})
	}
}

// interleavedDriver runs other (another replica's probe of the same
// storage) right after each of its own writes of path, before returning.
type interleavedDriver struct {
	driver.StorageDriver
	path  string
	other func()
}

func (d interleavedDriver) PutContent(ctx context.Context, p string, content []byte) error {
	err := d.StorageDriver.PutContent(ctx, p, content)
	if p == d.path {
		d.other()
	}
	return err
}

// TestProbeOfSharedStorage: replicas sharing a bucket probe the same
// object; one whose probe object the other removed in between is still
// writable (readiness must not flap when two probes overlap).
func TestProbeOfSharedStorage(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	fs := func() driver.StorageDriver {
		return filesystem.New(filesystem.DriverParameters{RootDirectory: root, MaxThreads: 10})
	}
	other := storage.New(fs())
	var otherErr error
	s := storage.New(interleavedDriver{StorageDriver: fs(), path: pathOf(t, storage.HealthPath{}),
		other: func() { otherErr = other.Probe(t.Context()) }})
	if err := s.Probe(t.Context()); err != nil {
		t.Fatalf("probe overlapped by another replica's: %v", err)
	}
	if otherErr != nil {
		t.Fatalf("the other replica's probe: %v", otherErr)
	}
	if f := files(t, fs(), "/"); len(f) != 0 {
		t.Fatalf("probes left %v", f)
	}
}
