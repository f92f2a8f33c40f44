package pull

import (
	"fmt"
	"hash"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// verifier reads a whole upstream blob body of size bytes, hashing it, and
// yields bytes [start, end) of it. Like a fill, it holds the blob's last
// byte back until size and digest are verified, and fails (never a clean
// EOF) on content that does not verify, so that a client is cut off
// rather than handed a corrupt blob.
type verifier struct {
	body       io.Reader
	dgst       digest.Digest
	h          hash.Hash
	size       int64
	start, end int64
	off        int64 // bytes read from body
	buf        []byte
	pending    []byte // bytes of [start, end) read but not handed out
	last       []byte // the blob's last byte, once read and in range
	err        error  // sticky
}

func newVerifier(body io.Reader, dgst digest.Digest, size, start, end int64) *verifier {
	return &verifier{body: body, dgst: dgst, h: dgst.Algorithm().Hash(), size: size, start: start, end: end}
}

func (v *verifier) Read(p []byte) (int, error) {
	for len(v.pending) == 0 {
		if v.err != nil {
			return 0, v.err
		}
		if v.off >= v.size {
			v.finish()
			continue
		}
		if v.buf == nil {
			v.buf = make([]byte, 256<<10)
		}
		n, rerr := v.body.Read(v.buf)
		chunk := v.buf[:n]
		if v.off+int64(n) > v.size {
			v.err = fmt.Errorf("%w: upstream sent more than %d bytes", storage.ErrSizeMismatch, v.size)
			continue
		}
		v.h.Write(chunk)
		if lo, hi := max(v.start, v.off), min(v.end, v.off+int64(n), v.size-1); lo < hi {
			v.pending = chunk[lo-v.off : hi-v.off]
		}
		if v.off+int64(n) == v.size && n > 0 && v.end == v.size {
			v.last = []byte{chunk[n-1]}
		}
		v.off += int64(n)
		switch {
		case rerr == io.EOF:
			if v.off < v.size {
				v.err = fmt.Errorf("%w: upstream sent %d of %d bytes", storage.ErrSizeMismatch, v.off, v.size)
			}
		case rerr != nil:
			v.err = fmt.Errorf("reading upstream at byte %d: %w", v.off, rerr)
		}
	}
	n := copy(p, v.pending)
	v.pending = v.pending[n:]
	return n, nil
}

// finish verifies the whole blob, then releases the held-back last byte
// and ends with io.EOF.
func (v *verifier) finish() {
	if got := digest.NewDigest(v.dgst.Algorithm(), v.h); got != v.dgst {
		v.err = fmt.Errorf("%w: upstream blob hashes to %s", storage.ErrDigestMismatch, got)
		return
	}
	v.pending, v.last, v.err = v.last, nil, io.EOF
}
