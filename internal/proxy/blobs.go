package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// serveBlob answers GET and HEAD /v2/<name>/blobs/<digest>: from the cache
// on a hit; on a miss by joining (or starting) the one fill of that digest
// and streaming from it as bytes arrive.
func (h *Handler) serveBlob(w http.ResponseWriter, r *http.Request, name string, dgst digest.Digest) {
	ctx := r.Context() // dgst is valid and its algorithm available (digest.Parse)
	if err := h.ensureLink(ctx, name, dgst, kindBlob); err != nil {
		writeError(w, toAPIError(err, kindBlob))
		return
	}
	if h.cache != nil && r.Method == http.MethodGet {
		// Before the lookup: eviction then either removed the blob
		// already (a miss) or leaves it until this response is sent.
		release, err := h.cache.Lease(ctx, dgst)
		if err != nil {
			return // the client went away
		}
		defer release()
	}
	size, err := h.store.StatBlob(ctx, dgst)
	if err == nil {
		if n, gone := h.serveCachedBlob(w, r, dgst, size); !gone {
			h.hit(dgst, n)
			return
		}
		// Removed (gc) between the lookup and the open: a miss after all.
		err = storage.ErrNotFound
	}
	if !errors.Is(err, storage.ErrNotFound) {
		h.log.Warn("blob cache lookup failed; treating as a miss", "digest", dgst, "err", err)
	}
	if r.Method == http.MethodHead {
		size, ok := h.fills.Size(dgst) // being fetched right now
		if !ok {
			ctx, cancel := h.upstreamContext(ctx)
			defer cancel()
			if size, err = h.up.HeadBlob(ctx, name, dgst); err != nil {
				writeError(w, toAPIError(err, kindBlob))
				return
			}
		}
		// The same headers (and Range answer) as the GET would have.
		if _, _, status, ok := h.rangeHeaders(w, r, dgst, size); ok {
			w.WriteHeader(status)
		}
		h.metrics.CacheResult("blob", metrics.Miss, 0)
		return
	}

	// A fill may find the blob cached, and gc or another process remove it
	// before it is opened: then fetch it after all, a few times at most.
	for attempt := 1; ; attempt++ {
		if h.serveFill(w, r, name, dgst, attempt == 3) {
			return
		}
	}
}

func (h *Handler) hit(dgst digest.Digest, n int64) {
	if h.cache != nil {
		h.cache.Touch("blob", dgst)
	}
	h.metrics.CacheResult("blob", metrics.Hit, n)
}

// serveFill answers a GET miss from the fill of dgst it joins or starts.
// It returns false, having written nothing, when the fill found the blob
// cached but it was gone when opened (unless last): the caller tries again.
func (h *Handler) serveFill(w http.ResponseWriter, r *http.Request, name string, dgst digest.Digest, last bool) (done bool) {
	ctx := r.Context()
	f, _, err := h.fills.Join(dgst, h.blobSource(name, dgst))
	if err != nil { // too many downloads at once: the client retries later
		e := newAPIError(errcode.ErrorCodeUnavailable, "too many blob downloads in progress; retry shortly")
		e.retryAfter = "5"
		writeError(w, e)
		return true
	}
	defer f.Release()
	size, err := f.Wait(ctx)
	switch {
	case errors.Is(err, fill.ErrCacheFull):
		// The budget refused it (logged and counted there).
		h.metrics.CacheResult("blob", metrics.Miss, h.serveDirect(w, r, name, dgst))
		return true
	case errors.Is(err, fill.ErrSpool):
		h.log.Warn("cannot spool blob; serving it straight from the upstream", "digest", dgst, "err", err)
		h.metrics.CacheResult("blob", metrics.Miss, h.serveDirect(w, r, name, dgst))
		return true
	case err != nil:
		if ctx.Err() == nil {
			writeError(w, toAPIError(err, kindBlob))
		}
		return true
	}
	if f.Cached() {
		n, gone := h.serveCachedBlob(w, r, dgst, size)
		if gone && !last {
			return false
		}
		if gone {
			writeError(w, newAPIError(errcode.ErrorCodeUnavailable, "the blob was removed while being served; retry"))
			return true
		}
		h.hit(dgst, n)
		return true
	}
	if h.verifyFirst(size) {
		vctx, cancel := context.WithTimeout(ctx, verifyWait)
		err := f.Verified(vctx)
		waited := vctx.Err() != nil // verifyWait passed (or the client left)
		cancel()
		switch {
		case ctx.Err() != nil:
			return true // the client went away
		case err != nil && !waited:
			// Nothing sent yet: a clear error instead of a cut-off 200.
			h.log.Warn("upstream blob failed before its response started; nothing cached", "digest", dgst, "err", err)
			writeError(w, toAPIError(err, kindBlob))
			return true
		}
		// Verified, or still arriving after verifyWait: stream it.
	}
	start, end, status, ok := h.rangeHeaders(w, r, dgst, size)
	if !ok {
		return true
	}
	w.WriteHeader(status)
	// Send the headers now, not with the first body bytes: a client whose
	// bytes are not there yet must not wait for headers (containerd gives
	// up after 30 s without them).
	_ = http.NewResponseController(w).Flush()
	n, err := io.Copy(w, f.NewReader(ctx, start, end))
	h.metrics.CacheResult("blob", metrics.Miss, n)
	if err != nil {
		if ctx.Err() == nil {
			h.log.Warn("aborting blob response: fill failed", "digest", dgst, "err", err)
		}
		// Never end a short body cleanly: the client must see a broken
		// transfer, not a truncated blob.
		panic(http.ErrAbortHandler)
	}
	return true
}

// serveDirect streams a blob from the upstream to one client without
// caching it, for when the local disk cannot take it. Like a fill, it holds
// the blob's last byte back until size and digest are verified, and aborts
// the connection on a mismatch.
// It returns the body bytes sent.
func (h *Handler) serveDirect(w http.ResponseWriter, r *http.Request, name string, dgst digest.Digest) (sent int64) {
	ctx := r.Context()
	body, size, err := h.blobSource(name, dgst)(ctx, 0)
	if err != nil {
		writeError(w, toAPIError(err, kindBlob))
		return 0
	}
	defer body.Close()
	if h.verifyFirst(size) {
		return h.serveDirectSmall(w, r, body, dgst, size)
	}
	start, end, status, ok := h.rangeHeaders(w, r, dgst, size)
	if !ok {
		return 0
	}
	w.WriteHeader(status)
	hasher := dgst.Algorithm().Hash()
	buf := make([]byte, 256<<10)
	var off int64
	var last []byte // the blob's last byte, once read
	for off < size {
		n, rerr := body.Read(buf)
		chunk := buf[:n]
		hasher.Write(chunk)
		if off+int64(n) > size {
			panic(http.ErrAbortHandler) // longer than announced
		}
		lo, hi := max(start, off), min(end, off+int64(n), size-1)
		if lo < hi {
			m, err := w.Write(chunk[lo-off : hi-off])
			sent += int64(m)
			if err != nil {
				panic(http.ErrAbortHandler)
			}
		}
		if off+int64(n) == size && n > 0 {
			last = chunk[n-1:]
		}
		off += int64(n)
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			panic(http.ErrAbortHandler)
		}
	}
	if off != size || digest.NewDigest(dgst.Algorithm(), hasher) != dgst {
		h.log.Warn("upstream blob failed verification; aborting the client", "digest", dgst)
		panic(http.ErrAbortHandler)
	}
	if end == size && size > 0 {
		m, _ := w.Write(last)
		sent += int64(m)
	}
	return sent
}

// verifyFirst reports whether a blob of size bytes is verified before its
// response status is sent (Options.VerifyBeforeHeaders).
func (h *Handler) verifyFirst(size int64) bool {
	return h.opts.VerifyBeforeHeaders >= 0 && size <= h.opts.VerifyBeforeHeaders
}

// serveDirectSmall is serveDirect for a blob small enough to hold in
// memory: it reads and verifies all of body before it answers, so that a
// mismatch is a 502 with the OCI error body.
func (h *Handler) serveDirectSmall(w http.ResponseWriter, r *http.Request, body io.Reader, dgst digest.Digest, size int64) (sent int64) {
	buf, err := io.ReadAll(io.LimitReader(body, size+1))
	if err != nil {
		if r.Context().Err() == nil {
			writeError(w, toAPIError(err, kindBlob))
		}
		return 0
	}
	if int64(len(buf)) != size || dgst.Algorithm().FromBytes(buf) != dgst {
		h.log.Warn("upstream blob failed verification; nothing sent", "digest", dgst)
		writeError(w, toAPIError(storage.ErrDigestMismatch, kindBlob))
		return 0
	}
	start, end, status, ok := h.rangeHeaders(w, r, dgst, size)
	if !ok {
		return 0
	}
	w.WriteHeader(status)
	n, _ := w.Write(buf[start:end])
	return int64(n)
}

// blobSource fetches dgst from repository name for a fill; when the
// upstream streams without Content-Length the size comes from a HEAD.
func (h *Handler) blobSource(name string, dgst digest.Digest) func(context.Context, int64) (io.ReadCloser, int64, error) {
	return func(ctx context.Context, off int64) (io.ReadCloser, int64, error) {
		b, err := h.up.GetBlob(ctx, name, dgst, off)
		if err != nil {
			return nil, 0, err
		}
		if b.Size < 0 {
			hctx, cancel := h.upstreamContext(ctx)
			defer cancel()
			size, herr := h.up.HeadBlob(hctx, name, dgst)
			if herr != nil {
				_ = b.Body.Close()
				return nil, 0, herr
			}
			b.Size = size
		}
		return b.Body, b.Size, nil
	}
}

// serveCachedBlob answers from the cache and returns the body bytes sent.
// gone reports that the blob disappeared before it was opened (nothing was
// written then, so the caller can treat the request as a miss).
func (h *Handler) serveCachedBlob(w http.ResponseWriter, r *http.Request, dgst digest.Digest, size int64) (sent int64, gone bool) {
	start, end, status, ok := h.rangeHeaders(w, r, dgst, size)
	if !ok {
		return 0, false
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return 0, false
	}
	if h.opts.BlobRedirect {
		if u, err := h.store.BlobURL(r, dgst); err == nil && u != "" {
			// The client follows with its Range; the URL (its signature)
			// is never logged.
			for _, k := range []string{"Content-Length", "Content-Range", "Content-Type", "Accept-Ranges", "Etag", "Cache-Control"} {
				w.Header().Del(k)
			}
			w.Header().Set("Location", u)
			w.WriteHeader(http.StatusTemporaryRedirect)
			return end - start, false
		} else if err != nil {
			h.log.Warn("no redirect URL for a cached blob; serving it", "digest", dgst, "err", err)
		}
	}
	rc, err := h.store.OpenBlob(r.Context(), dgst, start)
	if errors.Is(err, storage.ErrNotFound) {
		w.Header().Del("Content-Range")
		return 0, true
	}
	if err != nil {
		writeError(w, toAPIError(err, kindBlob))
		return 0, false
	}
	defer rc.Close()
	w.WriteHeader(status)
	// io.CopyN wraps rc in an io.LimitedReader, which net/http's sendfile
	// path still recognises around an *os.File.
	n, err := io.CopyN(w, rc, end-start)
	if err != nil {
		if r.Context().Err() == nil {
			h.log.Warn("aborting cached blob response", "digest", dgst, "err", err)
		}
		h.metrics.CacheResult("blob", metrics.Hit, n)
		panic(http.ErrAbortHandler)
	}
	return n, false
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
// the whole blob sent (RFC 9110 allows that). ok is false when the response
// was already written.
func (h *Handler) rangeHeaders(w http.ResponseWriter, r *http.Request, dgst digest.Digest, size int64) (start, end int64, status int, ok bool) {
	blobHeaders(w, dgst, size)
	start, end, rs := parseRange(r.Header.Get("Range"), size)
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
