package pull

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// The verifier hands out exactly the bytes of a range, and the whole blob
// is verified before its last byte (or, for a range short of the end,
// before EOF): a corrupt or short body is an error, never a clean end.
func TestVerifier(t *testing.T) {
	blob := bytes.Repeat([]byte("0123456789"), 100_000) // 1 MB: several reads
	d := digest.FromBytes(blob)
	size := int64(len(blob))
	for _, rg := range [][2]int64{{0, size}, {5, 17}, {size - 3, size}, {0, 0}} {
		got, err := io.ReadAll(newVerifier(iotest.HalfReader(bytes.NewReader(blob)), d, size, rg[0], rg[1]))
		if err != nil || !bytes.Equal(got, blob[rg[0]:rg[1]]) {
			t.Errorf("range %v: %d bytes, %v", rg, len(got), err)
		}
	}

	bad := bytes.Clone(blob)
	bad[len(bad)/2] ^= 1
	for _, rg := range [][2]int64{{0, size}, {0, 10}} {
		got, err := io.ReadAll(newVerifier(bytes.NewReader(bad), d, size, rg[0], rg[1]))
		if !errors.Is(err, storage.ErrDigestMismatch) {
			t.Errorf("corrupt, range %v: err %v", rg, err)
		}
		if rg[1] == size && len(got) >= int(size) {
			t.Errorf("corrupt: the last byte was handed out")
		}
	}
	if _, err := io.ReadAll(newVerifier(bytes.NewReader(blob[:size-1]), d, size, 0, size)); !errors.Is(err, storage.ErrSizeMismatch) {
		t.Errorf("short body: %v", err)
	}
	if _, err := io.ReadAll(newVerifier(bytes.NewReader(append(bytes.Clone(blob), 'x')), d, size, 0, size)); !errors.Is(err, storage.ErrSizeMismatch) {
		t.Errorf("long body: %v", err)
	}
	empty := digest.FromBytes(nil)
	if got, err := io.ReadAll(newVerifier(bytes.NewReader(nil), empty, 0, 0, 0)); err != nil || len(got) != 0 {
		t.Errorf("empty blob: %q %v", got, err)
	}
}
