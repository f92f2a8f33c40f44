package evict

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestOrderedMatchesStringOrder: the compact ranks a pass sorts order
// objects exactly as (effective time, digest string) do, ties on time and
// digests sharing their first 16 bytes included; pinned digests are left
// out.
func TestOrderedMatchesStringOrder(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	var items []item
	pinned := map[digest.Digest]bool{}
	for i := range 2000 {
		var d digest.Digest
		switch i % 4 {
		case 0: // the same first 16 bytes as others ("sha256:" + 9 hex digits)
			d = digest.Digest(fmt.Sprintf("sha256:000000000%055x", r.Uint64()))
		case 1:
			d = digest.Digest(fmt.Sprintf("sha512:%0128x", r.Uint64()))
		default:
			d = digest.FromString(fmt.Sprint(i))
		}
		kind := kBlob
		if i%7 == 0 {
			kind = kManifest
		}
		if i%50 == 0 {
			pinned[d] = true
		}
		items = append(items, item{k: key{kind, d}, eff: int64(r.IntN(5))}) // many ties
	}
	blobs, manifests := ordered(items, pinned)
	for _, tc := range []struct {
		kind uint8
		got  []*item
	}{{kBlob, blobs}, {kManifest, manifests}} {
		var want []*item
		for i := range items {
			if items[i].k.kind == tc.kind && !pinned[items[i].k.d] {
				want = append(want, &items[i])
			}
		}
		slices.SortFunc(want, func(a, b *item) int {
			if a.eff != b.eff {
				if a.eff < b.eff {
					return -1
				}
				return 1
			}
			return strings.Compare(string(a.k.d), string(b.k.d))
		})
		if len(tc.got) != len(want) {
			t.Fatalf("kind %d: %d items ordered, want %d", tc.kind, len(tc.got), len(want))
		}
		for i := range want {
			if tc.got[i] != want[i] {
				t.Fatalf("kind %d, position %d: %s (time %d), want %s (time %d)", tc.kind, i, tc.got[i].k.d, tc.got[i].eff, want[i].k.d, want[i].eff)
			}
		}
	}
}
