package proxy

import (
	"strconv"
	"strings"
	"testing"
)

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
