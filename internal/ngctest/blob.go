package ngctest

import "github.com/opencontainers/go-digest"

// AddBlob publishes blob c in repository without any manifest referring to
// it (benchmarks pull large blobs directly). The repository is created,
// public, if it does not exist yet. c.Body is kept, not copied.
func (u *Upstream) AddBlob(repository string, c Content) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.repos[repository] == nil {
		u.repos[repository] = newRepo()
	}
	u.repos[repository].holds[c.Digest] = true
	u.blobs[c.Digest] = c
}

// RemoveBlob stops serving blob d (404 from then on) and drops the fake's
// reference to its bytes, so that a large blob's memory can be reclaimed.
func (u *Upstream) RemoveBlob(d digest.Digest) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.blobs, d)
}
