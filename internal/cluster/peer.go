package cluster

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// The peer protocol, on the peer listener (cluster.listen) only:
//
//	GET /peer/v1/blobs/<digest>
//	Authorization: NGC-Mirror-Peer <unix seconds>:<hex HMAC-SHA256(secret, "GET\n<path>\n<unix seconds>")>
//	Range: bytes=<offset>-              (optional)
//
// answers 200 (206 from an offset, with Content-Range) with
// Ngc-Mirror-Blob-Size (the whole blob's bytes), the bytes from the offset
// as the serving replica's fill releases them (the last byte only once
// verified; a failed fill cuts the connection), and the trailer
// Ngc-Mirror-Committed: true once the blob is in the cache. Every error is
// the OCI error envelope (internal/ocierr) at its code's status: 401
// UNAUTHORIZED for a missing, stale (more than MaxSkew from the server's
// clock) or wrong signature (checked first, whatever the path; which part
// was wrong is not told), 404 NOT_FOUND for another path, 405 UNSUPPORTED
// for another method, 400 DIGEST_INVALID, 416 RANGE_INVALID for a Range
// not of that form or past the blob, 404 BLOB_UNKNOWN when the replica
// neither fills nor holds the blob, 503 UNAVAILABLE when it cannot serve
// it now. A static bearer would be replayable for ever by whoever saw one
// request; the signature is bound to the path and expires.
const (
	PeerPrefix      = "/peer/v1/blobs/"
	authScheme      = "NGC-Mirror-Peer"
	headerSize      = "Ngc-Mirror-Blob-Size"
	trailerCommited = "Ngc-Mirror-Committed"
)

// ErrNotServed is the peer endpoint's answer (404) when the replica
// neither runs a fill of the blob nor holds it in its cache.
var ErrNotServed = errors.New("cluster: the peer neither fills nor holds the blob")

// MaxSkew is how far a peer request's time may be from the server's clock
// (replicas' clocks must agree within it; NTP does).
const MaxSkew = 30 * time.Second

// sign returns the signature of a request for path at unix time ts.
func sign(secret []byte, method, path string, ts int64) string {
	m := hmac.New(sha256.New, secret)
	fmt.Fprintf(m, "%s\n%s\n%d", method, path, ts)
	return hex.EncodeToString(m.Sum(nil))
}

// authorized checks r's signature in constant time.
func authorized(secret []byte, r *http.Request, now time.Time) bool {
	v, ok := strings.CutPrefix(r.Header.Get("Authorization"), authScheme+" ")
	if !ok {
		return false
	}
	tsText, sig, ok := strings.Cut(v, ":")
	ts, err := strconv.ParseInt(tsText, 10, 64)
	if !ok || err != nil {
		return false
	}
	if d := now.Sub(time.Unix(ts, 0)); d > MaxSkew || d < -MaxSkew {
		return false
	}
	want := sign(secret, r.Method, r.URL.Path, ts)
	return hmac.Equal([]byte(sig), []byte(want))
}

// Peer is the client side: it streams blobs from other replicas.
type Peer struct {
	secret []byte
	c      *http.Client
	m      *metrics.Cluster
}

// NewPeer returns a client signing with secret over rt (nil: a clone of
// http.DefaultTransport with a response-header timeout of
// peerHeaderTimeout).
func NewPeer(secret []byte, rt http.RoundTripper, m *metrics.Cluster) *Peer {
	if rt == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = peerHeaderTimeout
		t.MaxIdleConnsPerHost = 16
		rt = t
	}
	return &Peer{secret: secret, c: &http.Client{Transport: rt}, m: m}
}

// peerHeaderTimeout bounds the wait for a peer's response headers, which
// it sends once its own fill knows the blob's size (its upstream exchange,
// bounded by its own timeouts, comes first).
const peerHeaderTimeout = 2 * time.Minute

// commitWait bounds how long a relay waits, after the last byte, for the
// owner's word that it committed (a server-side copy of a large blob on S3
// takes a while); past it the relay caches the blob itself.
const commitWait = 5 * time.Minute

// Get streams blob dgst from byte off on from the peer at base
// (scheme://host:port). It returns the body, the whole blob's size in
// bytes and committed, which (after the body's last byte was read) waits
// for the peer's trailer and reports whether the blob is in the peer's
// cache. Errors: the connection's, ErrNotServed (404), or another status
// (with the peer's OCI error code and message: a 401 UNAUTHORIZED is a
// cluster secret that differs between the replicas, or clocks apart).
func (p *Peer) Get(ctx context.Context, base string, dgst digest.Digest, off int64) (io.ReadCloser, int64, func(context.Context) bool, error) {
	path := PeerPrefix + dgst.String()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(base, "/")+path, nil)
	if err != nil {
		return nil, 0, nil, err
	}
	ts := time.Now().Unix()
	req.Header.Set("Authorization", fmt.Sprintf("%s %d:%s", authScheme, ts, sign(p.secret, http.MethodGet, path, ts)))
	if off > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", off))
	}
	resp, err := p.c.Do(req)
	if err != nil {
		p.m.PeerBlob(false)
		return nil, 0, nil, err
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		_ = resp.Body.Close()
		p.m.PeerBlob(false)
		if resp.StatusCode == http.StatusNotFound {
			return nil, 0, nil, ErrNotServed
		}
		if env, ok := ocierr.Decode(msg); ok {
			return nil, 0, nil, fmt.Errorf("cluster: peer answered %d (%s)", resp.StatusCode, env.Error())
		}
		return nil, 0, nil, fmt.Errorf("cluster: peer answered %d", resp.StatusCode)
	}
	size, err := strconv.ParseInt(resp.Header.Get(headerSize), 10, 64)
	if err != nil || size < 0 || off > size {
		_ = resp.Body.Close()
		p.m.PeerBlob(false)
		return nil, 0, nil, errors.New("cluster: peer answered without a valid blob size")
	}
	b := &peerBody{rc: resp.Body, want: size - off, m: p.m}
	committed := func(ctx context.Context) bool {
		// The trailer arrives after the body's end: read up to it.
		done := make(chan struct{})
		var ok bool
		go func() {
			defer close(done)
			if _, err := io.Copy(io.Discard, resp.Body); err == nil {
				ok = resp.Trailer.Get(trailerCommited) == "true"
			}
		}()
		t := time.NewTimer(commitWait)
		defer t.Stop()
		select {
		case <-done:
			return ok
		case <-t.C:
		case <-ctx.Done():
		}
		_ = resp.Body.Close()
		<-done
		return false
	}
	return b, size, committed, nil
}

// peerBody counts the bytes received and records how the stream ended.
type peerBody struct {
	rc     io.ReadCloser
	want   int64
	got    int64
	m      *metrics.Cluster
	closed bool
}

func (b *peerBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.got += int64(n)
	b.m.PeerIn(n)
	return n, err
}

func (b *peerBody) Close() error {
	if !b.closed {
		b.closed = true
		b.m.PeerBlob(b.got >= b.want)
	}
	return b.rc.Close()
}

// Blobs is what the peer endpoint serves from (*pull.Service).
type Blobs interface {
	// PeerBlob opens blob dgst from byte offset on: from a fill of it this
	// replica runs, or from the cache; never by starting a fetch. It
	// returns the body (Close it), the whole blob's size in bytes and
	// committed, which waits for the fill to end and reports whether the
	// blob is in the cache. An error wrapping storage.ErrNotFound means
	// neither.
	PeerBlob(ctx context.Context, dgst digest.Digest, offset int64) (body io.ReadCloser, size int64, committed func(context.Context) bool, err error)
}

// Server is the peer endpoint's handler.
type Server struct {
	secret []byte
	blobs  Blobs
	m      *metrics.Cluster
	log    *slog.Logger
}

// NewServer returns the handler of the peer listener: signed GETs of
// PeerPrefix+digest, served by blobs. Peers are other replicas that
// already authorised their client's request; the endpoint serves blobs by
// digest only, and never forwards a request.
func NewServer(secret []byte, blobs Blobs, m *metrics.Cluster, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{secret: secret, blobs: blobs, m: m, log: log}
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !authorized(s.secret, r, time.Now()) {
		// Never served anonymously; the reason (which part of the
		// signature) is not told, nor anything of the request echoed.
		w.Header().Set("WWW-Authenticate", authScheme)
		fail(w, errcode.ErrorCodeUnauthorized, "a peer request must be signed with the cluster secret (cluster.secret) within "+MaxSkew.String()+" of this replica's clock")
		return
	}
	ref, ok := strings.CutPrefix(r.URL.Path, PeerPrefix)
	if !ok {
		ocierr.Write(w, http.StatusNotFound, ocierr.New("NOT_FOUND", "no such endpoint (the peer listener serves GET "+PeerPrefix+"<digest>)"))
		return
	}
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		fail(w, errcode.ErrorCodeUnsupported, "the peer endpoint answers GET only")
		return
	}
	dgst, err := digest.Parse(ref)
	if err != nil {
		fail(w, errcode.ErrorCodeDigestInvalid, "invalid blob digest")
		return
	}
	var off int64
	if rg := r.Header.Get("Range"); rg != "" {
		v, ok := strings.CutPrefix(rg, "bytes=")
		v, open := strings.CutSuffix(v, "-")
		if off, err = strconv.ParseInt(v, 10, 64); !ok || !open || err != nil || off < 0 {
			fail(w, errcode.ErrorCodeRangeInvalid, "the peer endpoint takes Range: bytes=N- only")
			return
		}
	}
	body, size, committed, err := s.blobs.PeerBlob(r.Context(), dgst, off)
	if errors.Is(err, storage.ErrNotFound) {
		fail(w, errcode.ErrorCodeBlobUnknown, "this replica neither fills nor holds the blob")
		return
	}
	if err != nil {
		s.log.Warn("peer blob request failed", "digest", dgst, "err", err)
		fail(w, errcode.ErrorCodeUnavailable, "this replica cannot serve the blob now")
		return
	}
	defer body.Close()
	if off > size {
		w.Header().Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
		fail(w, errcode.ErrorCodeRangeInvalid, "the offset is past the blob's end")
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set(headerSize, strconv.FormatInt(size, 10))
	h.Set("Trailer", trailerCommited)
	status := http.StatusOK
	if off > 0 {
		status = http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, size-1, size))
	}
	w.WriteHeader(status)
	if f, ok := w.(http.Flusher); ok {
		f.Flush() // the size now; bytes as they come
	}
	n, err := io.Copy(&countingWriter{w: w, m: s.m}, body)
	if err != nil || n != size-off {
		// Never a clean short body: cut the connection.
		s.log.Debug("peer blob stream cut", "digest", dgst, "sent", n, "err", err)
		panic(http.ErrAbortHandler)
	}
	if committed(r.Context()) {
		h.Set(trailerCommited, "true")
	} else {
		h.Set(trailerCommited, "false")
	}
}

// fail answers a peer request with the OCI error envelope of code, at its
// status (errcode's descriptor). message is written for the peer and never
// holds the secret, the signature or other request text.
func fail(w http.ResponseWriter, code errcode.ErrorCode, message string) {
	ocierr.Write(w, code.Descriptor().HTTPStatusCode, ocierr.New(code.String(), message))
}

// countingWriter counts the bytes sent to a peer as they go (the metric
// moves during a long stream, not only at its end).
type countingWriter struct {
	w io.Writer
	m *metrics.Cluster
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.m.PeerOut(int64(n))
	return n, err
}
