package proxy

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestRangeIfRange: a Range is honoured only when If-Range is absent or the
// blob's strong ETag; another tag, a weak one or a date sends the whole
// blob with 200 (RFC 9110 13.1.5: the server MUST ignore Range then).
func TestRangeIfRange(t *testing.T) {
	t.Parallel()
	d := digest.FromString("blob")
	for _, tc := range []struct {
		ifRange string
		status  int
	}{
		{"", http.StatusPartialContent},
		{`"` + d.String() + `"`, http.StatusPartialContent},
		{`"sha256:0000000000000000000000000000000000000000000000000000000000000000"`, http.StatusOK},
		{`W/"` + d.String() + `"`, http.StatusOK},
		{"Thu, 03 Dec 2026 17:00:00 GMT", http.StatusOK},
	} {
		r := httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/v2/x/blobs/"+d.String(), nil)
		r.Header.Set("Range", "bytes=0-9")
		if tc.ifRange != "" {
			r.Header.Set("If-Range", tc.ifRange)
		}
		w := httptest.NewRecorder()
		start, end, status, ok := rangeHeaders(w, r, d, 100)
		wantEnd, wantCR := int64(10), "bytes 0-9/100"
		if tc.status == http.StatusOK {
			wantEnd, wantCR = 100, ""
		}
		if !ok || status != tc.status || start != 0 || end != wantEnd || w.Header().Get("Content-Range") != wantCR {
			t.Errorf("If-Range %q: %d [%d, %d) Content-Range %q ok=%v; want %d [0, %d) %q", tc.ifRange, status, start, end, w.Header().Get("Content-Range"), ok, tc.status, wantEnd, wantCR)
		}
	}
}

func TestParseRange(t *testing.T) {
	t.Parallel()
	const size = 100
	for _, tc := range []struct {
		v          string
		size       int64
		start, end int64
		res        rangeResult
	}{
		// Satisfiable single ranges: [start, end).
		{"bytes=0-0", size, 0, 1, rangeOK},
		{"bytes=10-99", size, 10, 100, rangeOK},
		{"bytes=10-", size, 10, 100, rangeOK},
		{"bytes=99-", size, 99, 100, rangeOK},
		{"bytes=0-", size, 0, 100, rangeOK},
		{"bytes=-5", size, 95, 100, rangeOK},
		{"bytes=-100", size, 0, 100, rangeOK},
		{"bytes=-500", size, 0, 100, rangeOK},     // suffix longer than the blob
		{"bytes=10-1000", size, 10, 100, rangeOK}, // end clipped to the size
		{"bytes=50-50", size, 50, 51, rangeOK},
		{" bytes=1-2 ", size, 1, 3, rangeOK},
		{"bytes= 1-2", size, 1, 3, rangeOK},
		{"bytes=0-0", 1, 0, 1, rangeOK},
		{"bytes=-1", 1, 0, 1, rangeOK},

		// Unsatisfiable: 416.
		{"bytes=-0", size, 0, 0, rangeUnsatisfiable},
		{"bytes=100-", size, 0, 0, rangeUnsatisfiable},
		{"bytes=100-200", size, 0, 0, rangeUnsatisfiable},
		{"bytes=150-", size, 0, 0, rangeUnsatisfiable},
		{"bytes=0-0", 0, 0, 0, rangeUnsatisfiable}, // empty blob
		{"bytes=0-", 0, 0, 0, rangeUnsatisfiable},
		{"bytes=-5", 0, 0, 0, rangeUnsatisfiable},

		// Ignored (the whole blob is sent): absent, malformed, multiple.
		{"", size, 0, 0, rangeNone},
		{"", 0, 0, 0, rangeNone},
		{"bytes=0-1,5-6", size, 0, 0, rangeNone},
		{"bytes=0-1, 5-6", size, 0, 0, rangeNone},
		{"bytes=9-5", size, 0, 0, rangeNone}, // last before first
		{"bytes=abc", size, 0, 0, rangeNone},
		{"bytes=5", size, 0, 0, rangeNone},
		{"bytes=-", size, 0, 0, rangeNone},
		{"bytes=--5", size, 0, 0, rangeNone},
		{"bytes=-5-", size, 0, 0, rangeNone},
		{"bytes=a-5", size, 0, 0, rangeNone},
		{"bytes=5-a", size, 0, 0, rangeNone},
		{"bytes=-1-5", size, 0, 0, rangeNone},
		{"bytes=", size, 0, 0, rangeNone},
		{"items=0-5", size, 0, 0, rangeNone},
		{"0-5", size, 0, 0, rangeNone},
		{"bytes 0-5", size, 0, 0, rangeNone},
		{"bytes=99999999999999999999-", size, 0, 0, rangeUnsatisfiable}, // past any end (overflows int64)
	} {
		start, end, res := parseRange(tc.v, tc.size)
		if res != tc.res || start != tc.start || end != tc.end {
			t.Errorf("parseRange(%q, %d) = %d, %d, %v; want %d, %d, %v", tc.v, tc.size, start, end, res, tc.start, tc.end, tc.res)
		}
	}
}

func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"bytes=0-0", "bytes=10-99", "bytes=10-", "bytes=-5", "bytes=-0", "bytes=0-1,2-3", "bytes=9-5", "", "bytes=-9223372036854775808", "bytes=9223372036854775807-"} {
		for _, size := range []int64{0, 1, 100, 1 << 40} {
			f.Add(s, size)
		}
	}
	f.Fuzz(func(t *testing.T, v string, size int64) {
		if size < 0 {
			size = -(size + 1) // sizes are never negative
		}
		start, end, res := parseRange(v, size)
		switch res {
		case rangeOK:
			if start < 0 || start >= end || end > size {
				t.Fatalf("parseRange(%q, %d) = [%d, %d): not within the blob", v, size, start, end)
			}
			if strings.Contains(v, ",") {
				t.Fatalf("parseRange(%q, %d) accepted a multi-range header", v, size)
			}
		case rangeNone, rangeUnsatisfiable:
			if start != 0 || end != 0 {
				t.Fatalf("parseRange(%q, %d) = %d, %d with result %v", v, size, start, end, res)
			}
			// A non-zero suffix of a non-empty blob is always satisfiable.
			if spec, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes="); ok && size > 0 {
				if suffix, ok := strings.CutPrefix(strings.TrimSpace(spec), "-"); ok {
					if n, err := strconv.ParseInt(suffix, 10, 64); err == nil && n > 0 {
						t.Fatalf("parseRange(%q, %d): suffix range refused (%v)", v, size, res)
					}
				}
			}
		default:
			t.Fatalf("parseRange(%q, %d): unknown result %v", v, size, res)
		}
	})
}
