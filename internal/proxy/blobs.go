package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
)

// serveBlob answers GET and HEAD /v2/<name>/blobs/<digest> from the
// pull-through service: HEAD from what it knows of the blob (nothing is
// fetched), GET with the bytes of the cache, of the running fill (as they
// arrive) or of the upstream (when the cache refuses the blob).
func (h *Handler) serveBlob(w http.ResponseWriter, r *http.Request, name string, dgst digest.Digest) {
	ctx := r.Context() // dgst is valid and its algorithm available (digest.Parse)
	notModified := etagMatches(r, dgst)
	if r.Method == http.MethodHead || notModified {
		// A conditional GET whose ETag matches is answered like a HEAD
		// (nothing is fetched), with 304 (RFC 9110 13.1.2).
		size, hit, err := h.pull.StatBlob(ctx, name, dgst)
		if err != nil {
			writeError(w, toAPIError(err, kindBlob))
			return
		}
		// The same headers (and Range answer) as the GET would have;
		// If-None-Match goes before Range (RFC 9110 13.2.2).
		if notModified {
			blobHeaders(w, dgst, size)
			w.WriteHeader(http.StatusNotModified)
		} else if _, _, status, ok := rangeHeaders(w, r, dgst, size); ok {
			w.WriteHeader(status)
		}
		h.cacheResult(r, metrics.RouteBlob, cacheResult(hit), 0)
		return
	}
	b, err := h.pull.Blob(ctx, name, dgst)
	if err != nil {
		if ctx.Err() == nil { // else the client went away
			writeError(w, toAPIError(err, kindBlob))
		}
		return
	}
	defer b.Close()
	if !b.Hit() && h.verifyFirst(b.Size) {
		vctx, cancel := context.WithTimeout(ctx, verifyWait)
		err := b.WaitVerified(vctx)
		waited := vctx.Err() != nil // verifyWait passed (or the client left)
		cancel()
		switch {
		case ctx.Err() != nil:
			return // the client went away
		case err != nil && !waited:
			// Nothing sent yet: a clear error instead of a cut-off 200.
			h.log.Warn("upstream blob failed before its response started; nothing cached", "digest", dgst, "err", err)
			writeError(w, toAPIError(err, kindBlob))
			return
		}
		// Verified, or still arriving after verifyWait: stream it.
	}
	start, end, status, ok := rangeHeaders(w, r, dgst, b.Size)
	if !ok {
		return
	}
	if u, err := b.RedirectURL(r); err == nil && u != "" {
		// The client follows with its Range; the URL (its signature) is
		// never logged.
		for _, k := range []string{"Content-Length", "Content-Range", "Content-Type", "Accept-Ranges", "Etag", "Cache-Control"} {
			w.Header().Del(k)
		}
		w.Header().Set("Location", u)
		w.WriteHeader(http.StatusTemporaryRedirect)
		h.cacheResult(r, metrics.RouteBlob, metrics.Hit, end-start)
		return
	} else if err != nil {
		h.log.Warn("no redirect URL for a cached blob; serving it", "digest", dgst, "err", err)
	}
	body, err := b.Open(start, end)
	if err != nil {
		w.Header().Del("Content-Range")
		if ctx.Err() == nil {
			writeError(w, toAPIError(err, kindBlob))
		}
		return
	}
	w.WriteHeader(status)
	if !b.Hit() {
		// Send the headers now, not with the first body bytes: a client
		// whose bytes are not there yet must not wait for headers
		// (containerd gives up after 30 s without them).
		_ = http.NewResponseController(w).Flush()
	}
	n, err := io.Copy(w, body)
	if err == nil && n != end-start {
		err = io.ErrUnexpectedEOF
	}
	h.cacheResult(r, metrics.RouteBlob, cacheResult(b.Hit()), n)
	if err != nil {
		if ctx.Err() != nil || clientGone(err) {
			// A client that leaves (or cancels) mid-body is normal.
			h.log.Debug("client went away mid-blob", "digest", dgst, "bytes", n, "err", err)
		} else {
			h.log.Warn("aborting blob response", "digest", dgst, "err", err)
		}
		// Never end a short body cleanly: the client must see a broken
		// transfer, not a truncated blob.
		panic(http.ErrAbortHandler)
	}
}

// clientGone reports whether err, from sending a response body, is the
// client's connection refusing the bytes (the client closed or reset it:
// EPIPE, ECONNRESET) rather than the body's source failing. net/http sends
// a body with the connection's ReadFrom (sendfile for a cached file),
// which wraps both kinds in a *net.OpError "readfrom" and leaves the
// request's context live; only the client's has the syscall error of the
// write (sendfile, or a *net.OpError "write") right inside it. An
// upstream's reset comes as a *net.OpError "read", or wrapped by the fill,
// and stays a failure.
func clientGone(err error) bool {
	var oe *net.OpError
	if !errors.As(err, &oe) {
		return false
	}
	if in, ok := oe.Err.(*net.OpError); ok && oe.Op == "readfrom" {
		oe = in // the copy's own write to the client
	}
	se, ok := oe.Err.(*os.SyscallError)
	return ok && (oe.Op == "write" || oe.Op == "readfrom") &&
		(errors.Is(se.Err, syscall.EPIPE) || errors.Is(se.Err, syscall.ECONNRESET))
}

// verifyFirst reports whether a blob of size bytes is verified before its
// response status is sent (Options.VerifyBeforeHeaders).
func (h *Handler) verifyFirst(size int64) bool {
	return h.opts.VerifyBeforeHeaders >= 0 && size <= h.opts.VerifyBeforeHeaders
}

func cacheResult(hit bool) string {
	if hit {
		return metrics.Hit
	}
	return metrics.Miss
}

// etagMatches reports whether r's If-None-Match names the ETag the mirror
// sends for content d ("<digest>", weak or strong: the weak comparison of
// RFC 9110 8.8.3.2), or is "*". For GET and HEAD a match is answered 304.
func etagMatches(r *http.Request, d digest.Digest) bool {
	v := r.Header.Get("If-None-Match")
	if v == "" {
		return false
	}
	for _, t := range strings.Split(v, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == "*" || t == `"`+d.String()+`"` {
			return true
		}
	}
	return false
}

func blobHeaders(w http.ResponseWriter, dgst digest.Digest, size int64) {
	hd := w.Header()
	hd.Set("Content-Type", "application/octet-stream")
	hd.Set("Content-Length", strconv.FormatInt(size, 10))
	hd.Set("Docker-Content-Digest", dgst.String())
	hd.Set("Accept-Ranges", "bytes")
	hd.Set("Etag", `"`+dgst.String()+`"`)
	hd.Set("Cache-Control", "max-age=31536000")
}

// rangeHeaders sets the headers for a blob of size bytes and picks the
// bytes [start, end) to send. A single "bytes=" range gets 206 with its
// Content-Range; an unsatisfiable one 416 with "Content-Range: bytes */SIZE"
// (RFC 9110 section 14); a malformed or multi-range header is ignored and
// the whole blob sent (RFC 9110 allows that), and so is a Range whose
// If-Range is not the blob's ETag (a date or a weak tag never matches: RFC
// 9110 13.1.5). ok is false when the response was already written.
func rangeHeaders(w http.ResponseWriter, r *http.Request, dgst digest.Digest, size int64) (start, end int64, status int, ok bool) {
	blobHeaders(w, dgst, size)
	rv := r.Header.Get("Range")
	if ir := r.Header.Get("If-Range"); ir != "" && strings.TrimSpace(ir) != `"`+dgst.String()+`"` {
		rv = "" // the client's copy is another representation: send it all
	}
	start, end, rs := parseRange(rv, size)
	switch rs {
	case rangeUnsatisfiable:
		w.Header().Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
		e := newAPIError(errcode.ErrorCodeRangeInvalid, "requested range not satisfiable")
		e.status = http.StatusRequestedRangeNotSatisfiable
		writeError(w, e)
		return 0, 0, 0, false
	case rangeOK:
		w.Header().Set("Content-Range", "bytes "+strconv.FormatInt(start, 10)+"-"+strconv.FormatInt(end-1, 10)+"/"+strconv.FormatInt(size, 10))
		w.Header().Set("Content-Length", strconv.FormatInt(end-start, 10))
		return start, end, http.StatusPartialContent, true
	}
	return 0, size, http.StatusOK, true
}

type rangeResult int

const (
	rangeNone rangeResult = iota // absent, malformed or multiple: send it all
	rangeOK
	rangeUnsatisfiable
)

// parseRange parses a single "bytes=FIRST-LAST", "bytes=FIRST-" or
// "bytes=-SUFFIX" range against size and returns [start, end).
func parseRange(v string, size int64) (start, end int64, res rangeResult) {
	spec, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, rangeNone
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, 0, rangeNone
	}
	if first == "" { // suffix range
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n < 0 {
			return 0, 0, rangeNone
		}
		if n == 0 || size == 0 {
			return 0, 0, rangeUnsatisfiable
		}
		return max(size-n, 0), size, rangeOK
	}
	s, err := strconv.ParseInt(first, 10, 64)
	if errors.Is(err, strconv.ErrRange) && strings.Trim(first, "0123456789") == "" {
		return 0, 0, rangeUnsatisfiable // a valid number past any blob's end
	}
	if err != nil || s < 0 {
		return 0, 0, rangeNone
	}
	e := size - 1
	if last != "" {
		if e, err = strconv.ParseInt(last, 10, 64); err != nil || e < s {
			return 0, 0, rangeNone
		}
	}
	if s >= size {
		return 0, 0, rangeUnsatisfiable
	}
	return s, min(e, size-1) + 1, rangeOK
}
