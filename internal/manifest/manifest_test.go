package manifest

import (
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestReferences(t *testing.T) {
	t.Parallel()
	d1, d2, d3 := digest.FromString("a"), digest.FromString("b"), digest.FromString("c")
	for _, tc := range []struct {
		name string
		body string
		want []digest.Digest
		err  bool
	}{
		{"image", `{"schemaVersion":2,"config":{"digest":"` + d1.String() + `","size":1},"layers":[{"digest":"` + d2.String() + `"},{"digest":"` + d3.String() + `"}]}`, []digest.Digest{d1, d2, d3}, false},
		{"index with platforms", `{"manifests":[{"digest":"` + d1.String() + `","platform":{"os":"linux","architecture":"arm64"}}]}`, []digest.Digest{d1}, false},
		{"subject", `{"config":{"digest":"` + d1.String() + `"},"subject":{"digest":"` + d2.String() + `"}}`, []digest.Digest{d1, d2}, false},
		{"bad digest skipped", `{"layers":[{"digest":"sha256:zz"},{"digest":"` + d2.String() + `"}]}`, []digest.Digest{d2}, false},
		{"empty object", `{}`, nil, false},
		{"not JSON", `<html>`, nil, true},
		{"array", `[]`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := References([]byte(tc.body))
			if (err != nil) != tc.err {
				t.Fatalf("err %v", err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %d references, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if got[i].Digest != tc.want[i] {
					t.Fatalf("ref %d = %s, want %s", i, got[i].Digest, tc.want[i])
				}
			}
		})
	}
}

// FuzzReferences: manifest descriptor parsing never panics and returns
// only valid digests.
func FuzzReferences(f *testing.F) {
	f.Add([]byte(`{"config":{"digest":"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}}`))
	f.Add([]byte(`{"manifests":[{"digest":"x","platform":{"os":"linux"}}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		refs, err := References(body)
		if err != nil {
			return
		}
		for _, r := range refs {
			if r.Digest.Validate() != nil {
				t.Fatalf("invalid digest %q returned", r.Digest)
			}
		}
	})
}

func TestMatchPlatform(t *testing.T) {
	for _, c := range []struct {
		platform, want string
		match          bool
	}{
		{"linux/amd64", "linux/amd64", true},
		{"linux/arm64/v8", "linux/arm64", true},
		{"linux/arm64", "linux/arm64/v8", true},
		{"linux/arm64", "linux/arm", false},
		{"linux/arm/v7", "linux/arm64", false},
		{"linux/arm/v7", "linux/arm/v6", false},
		{"linux/amd64", "linux/arm64", false},
	} {
		if got := MatchPlatform(c.platform, c.want); got != c.match {
			t.Errorf("MatchPlatform(%q, %q) = %v", c.platform, c.want, got)
		}
	}
}
