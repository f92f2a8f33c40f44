package proxy

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
)

// serveManifest answers GET and HEAD /v2/<name>/manifests/<reference>. HEAD
// resolves the manifest exactly as GET does (fetching it on a cold cache),
// so both carry the same Content-Type, Content-Length and
// Docker-Content-Digest; nvcr.io has answered 403 to manifest HEADs, so the
// mirror does not rely on them for a cold HEAD.
func (h *Handler) serveManifest(w http.ResponseWriter, r *http.Request, name, ref string) {
	if _, _, err := names.ParseTagOrDigest(ref); errors.Is(err, names.ErrDigestInvalid) {
		writeError(w, newAPIError(errcode.ErrorCodeDigestInvalid, "invalid manifest digest"))
		return
	} else if err != nil {
		writeError(w, newAPIError(errcode.ErrorCodeTagInvalid, "invalid tag"))
		return
	}
	m, err := h.pull.Manifest(r.Context(), name, ref)
	if err != nil {
		if errors.Is(err, r.Context().Err()) && r.Context().Err() != nil {
			return // the client went away
		}
		h.log.Debug("manifest request failed", "repository", name, "reference", ref, "err", err)
		writeError(w, toAPIError(err, kindManifest))
		return
	}
	hd := w.Header()
	hd.Set("Content-Type", m.MediaType)
	hd.Set("Content-Length", strconv.Itoa(len(m.Body)))
	hd.Set("Docker-Content-Digest", m.Digest.String())
	hd.Set("Etag", `"`+m.Digest.String()+`"`)
	status := http.StatusOK
	if etagMatches(r, m.Digest) {
		status = http.StatusNotModified // the client has it (RFC 9110 13.1.2)
	}
	w.WriteHeader(status)
	var sent int64
	if r.Method != http.MethodHead && status == http.StatusOK {
		n, _ := w.Write(m.Body)
		sent = int64(n)
	}
	h.cacheResult(r, metrics.RouteManifest, cacheResult(m.Hit), sent)
	if h.opts.Pulls != nil {
		ev := tracking.ManifestServed{Repository: name, Reference: ref, Digest: m.Digest, MediaType: m.MediaType,
			Client: tracking.ClientOf(r, userOf(r)), Time: time.Now()}
		if r.Method != http.MethodHead && status == http.StatusOK {
			ev.Body = m.Body
		}
		h.opts.Pulls.Served(ev)
	}
}

// userOf returns the authenticated user of r ("" when anonymous).
func userOf(r *http.Request) string {
	if ri, ok := r.Context().Value(routeKey{}).(*routeInfo); ok {
		return ri.user
	}
	return ""
}
