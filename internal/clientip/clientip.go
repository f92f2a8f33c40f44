// Package clientip resolves the client address of a registry request, for
// per-client rate limiting, the pull history and the access log. A
// request's TCP peer is the client unless it is one of the configured
// trusted proxies (a load balancer such as HAProxy with `option
// forwardfor`, an ingress controller): then the client is the right-most
// X-Forwarded-For entry that is not a trusted proxy itself. The header is
// never read from any other peer, so a client that reaches the mirror
// directly cannot choose its own address. The walk is chi's
// middleware.ClientIPFromXFF (fail-closed on a malformed entry).
package clientip

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/go-chi/chi/v5/middleware"
)

// ParseTrusted parses trusted proxies given as CIDR prefixes
// ("10.0.0.0/8", "fd00::/8") or single addresses ("10.0.0.5", a /32 or
// /128). The error names the first entry that is neither, or that is a
// /0 (0.0.0.0/0, ::/0): trusting every address would let any client
// choose its own address for rate limits and logs.
func ParseTrusted(entries []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(entries))
	for _, e := range entries {
		if p, err := netip.ParsePrefix(e); err == nil {
			if p.Bits() == 0 {
				return nil, fmt.Errorf("%q trusts every address, so any client could choose its own by X-Forwarded-For; list the balancers' addresses", e)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(e)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("%q is neither a CIDR prefix (10.0.0.0/8) nor an IP address", e)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// Middleware returns the handler wrapper that resolves each request's
// client address for Of: from X-Forwarded-For when the peer is in trusted,
// else (and always with no trusted proxies) the peer itself. It must wrap
// everything that calls Of.
func Middleware(trusted []netip.Prefix) func(http.Handler) http.Handler {
	if len(trusted) == 0 {
		return middleware.ClientIPFromRemoteAddr
	}
	cidrs := make([]string, len(trusted))
	for i, p := range trusted {
		cidrs[i] = p.String()
	}
	return middleware.ClientIPFromXFF(cidrs...)
}

// Of returns the client IP address of r as Middleware resolved it. Without
// Middleware, or when it found none (a trusted peer that sent no usable
// X-Forwarded-For, or only trusted hops in it), it is the TCP peer's
// address.
func Of(r *http.Request) string {
	if ip := middleware.GetClientIP(r.Context()); ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}
