package clientip

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestOf: the peer is the client unless it is a trusted proxy; then the
// right-most X-Forwarded-For entry that is not trusted is (several headers
// count as one list, in order). A header from an untrusted peer, and a
// malformed entry, are never believed.
func TestOf(t *testing.T) {
	t.Parallel()
	trusted, err := ParseTrusted([]string{"10.0.0.5", "10.1.0.0/16", "fd00::/8"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		trusted bool // Middleware with the trusted proxies, else none
		peer    string
		xff     []string
		want    string
	}{
		{"no proxies: the peer", false, "10.0.0.5:4000", []string{"192.0.2.1"}, "10.0.0.5"},
		{"untrusted peer: header ignored", true, "192.0.2.9:4000", []string{"198.51.100.1"}, "192.0.2.9"},
		{"trusted peer: the client it names", true, "10.0.0.5:4000", []string{"192.0.2.1"}, "192.0.2.1"},
		{"a spoofed entry left of the balancer's", true, "10.0.0.5:4000", []string{"203.0.113.1, 192.0.2.1"}, "192.0.2.1"},
		{"two trusted hops", true, "10.0.0.5:4000", []string{"192.0.2.1, 10.1.2.3"}, "192.0.2.1"},
		{"several headers are one list", true, "10.0.0.5:4000", []string{"203.0.113.1", "192.0.2.1"}, "192.0.2.1"},
		{"IPv6 peer and client", true, "[fd00::1]:4000", []string{"2001:db8::7"}, "2001:db8::7"},
		{"trusted peer, no header: the peer", true, "10.0.0.5:4000", nil, "10.0.0.5"},
		{"malformed right-most entry: the peer", true, "10.0.0.5:4000", []string{"192.0.2.1, not-an-ip"}, "10.0.0.5"},
		{"only trusted hops: the peer", true, "10.0.0.5:4000", []string{"10.1.0.1"}, "10.0.0.5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "/v2/", nil)
			req.RemoteAddr = tc.peer
			for _, v := range tc.xff {
				req.Header.Add("X-Forwarded-For", v)
			}
			var got string
			var proxies = trusted
			if !tc.trusted {
				proxies = nil
			}
			Middleware(proxies)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got = Of(r) })).ServeHTTP(httptest.NewRecorder(), req)
			if got != tc.want {
				t.Errorf("Of = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestParseTrusted: a single address is its own /32 or /128; a v4-mapped
// address is its IPv4 one; names and zones are refused.
func TestParseTrusted(t *testing.T) {
	t.Parallel()
	got, err := ParseTrusted([]string{"10.0.0.5", "::1", "::ffff:10.0.0.6", "10.1.2.3/16"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.5/32", "::1/128", "10.0.0.6/32", "10.1.0.0/16"}
	for i, p := range got {
		if p.String() != want[i] {
			t.Errorf("entry %d: %s, want %s", i, p, want[i])
		}
	}
	for _, bad := range []string{"lb.lab", "fe80::1%eth0", "10.0.0.0/40", "", "0.0.0.0/0", "::/0"} {
		if _, err := ParseTrusted([]string{bad}); err == nil {
			t.Errorf("ParseTrusted(%q) accepted", bad)
		}
	}
}
