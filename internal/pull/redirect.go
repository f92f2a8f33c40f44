package pull

import (
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// redirectHold is how long a blob stays leased after a redirect to its
// presigned URL: the URL's lifetime, plus a margin for a client that starts
// its GET just before the URL expires (the download itself then streams
// from the store; a read that has started is not what eviction can cut).
const redirectHold = storage.RedirectLifetime + 5*time.Minute

// maxRedirectHolds bounds the blobs held for redirects (a few hundred
// bytes each). Beyond it a cache hit is served by the mirror instead of
// redirected (Blob.RedirectURL returns ""), so nothing a client was sent to is ever evicted under it.
const maxRedirectHolds = 50_000

// redirectHolds keeps an eviction lease on each blob a client was
// redirected to until the presigned URL expires: the client's GET to the
// store comes after the mirror's response ended, and eviction must not
// remove the blob in between. One hold per digest, extended by each
// redirect, so memory follows the number of distinct blobs redirected to
// within the URL lifetime, up to maxRedirectHolds.
type redirectHolds struct {
	mu  sync.Mutex
	m   map[digest.Digest]*heldLease
	max int
	d   time.Duration
}

type heldLease struct {
	release func()
	until   time.Time
}

func newRedirectHolds() *redirectHolds {
	return &redirectHolds{m: map[digest.Digest]*heldLease{}, max: maxRedirectHolds, d: redirectHold}
}

// keep takes over release, a lease on dgst, and calls it once the hold
// ends (redirectHold from now; a later keep of dgst extends it). A hold
// on dgst already running is extended and release called at once. keep
// returns false, and leaves release to the caller, when maxRedirectHolds
// blobs are held already: then do not redirect.
func (h *redirectHolds) keep(dgst digest.Digest, release func()) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	until := time.Now().Add(h.d)
	if hl := h.m[dgst]; hl != nil {
		hl.until = until
		release()
		return true
	}
	if len(h.m) >= h.max {
		return false
	}
	hl := &heldLease{release: release, until: until}
	h.m[dgst] = hl
	var expire func()
	expire = func() {
		h.mu.Lock()
		if left := time.Until(hl.until); left > 0 {
			h.mu.Unlock()
			time.AfterFunc(left, expire) // extended meanwhile
			return
		}
		delete(h.m, dgst)
		h.mu.Unlock()
		hl.release()
	}
	time.AfterFunc(h.d, expire)
	return true
}
