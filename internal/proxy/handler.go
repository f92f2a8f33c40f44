// Package proxy is the mirror's HTTP face: the read side of the OCI
// Distribution v2 API (manifests, blobs, tag lists). It routes, validates
// names, references and digests, applies the access policy, parses Range,
// sets headers and maps errors to the OCI error envelope; what is served
// comes from the pull-through service (internal/pull).
package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Options configure a Handler.
type Options struct {
	// NSAliases are extra values of containerd's ?ns= query that select the
	// default upstream, besides its names in the pull service's
	// upstream.Set (for example "nvcr.io" when the upstream URL is some
	// other address of it).
	NSAliases []string
	Log       *slog.Logger
	Metrics   *metrics.Metrics // nil records nothing
	// Access decides who may pull what. nil serves everything to everyone
	// (tests); cmd/mirror always sets one, whose default opens only the
	// public namespaces. With a policy, the pull service must check links
	// (pull.Options.CheckLinks).
	Access *access.Policy
	// Pulls, when set, is told of every manifest served (GET or HEAD with
	// status 200), for the pull history. It must not block.
	Pulls PullRecorder
	// VerifyBeforeHeaders is the size (bytes) up to which a blob fetched
	// from the upstream is verified whole (size and digest) before the
	// response status is sent, so that bad content (a proxy's page, a
	// corrupt CDN object) is answered 502 in the OCI error envelope rather
	// than with a 200 cut off mid-body. Image configs and small layers
	// arrive in well under a second; the wait is bounded by verifyWait,
	// after which the blob streams as a large one does. Larger blobs get
	// their headers as soon as the size is known (containerd gives up
	// after 30 s without them) and a failed check aborts the transfer.
	// Default 4 MiB (DefaultVerifyBeforeHeaders); negative: never.
	VerifyBeforeHeaders int64
	// AccessLog logs every request at info level (else at debug): see
	// observe for its fields.
	AccessLog bool
}

// DefaultVerifyBeforeHeaders is Options.VerifyBeforeHeaders' default (bytes):
// 4 MiB, the manifest size limit, so that every config and most small
// layers are verified before their status.
const DefaultVerifyBeforeHeaders = 4 << 20

// verifyWait bounds how long a small blob's response waits for its fill to
// be verified before it starts streaming anyway (a slow uplink): headers
// must arrive well before containerd's 30 s.
const verifyWait = 10 * time.Second

// PullRecorder receives served manifests (*tracking.Tracker).
type PullRecorder interface {
	Served(tracking.ManifestServed)
}

// Handler serves the registry API over the pull-through service. Build it
// with New.
type Handler struct {
	pull    *pull.Service
	opts    Options
	log     *slog.Logger
	metrics *metrics.Metrics
	access  *access.Policy
	router  chi.Router
}

// New returns the registry API handler over svc.
func New(svc *pull.Service, opts Options) *Handler {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.VerifyBeforeHeaders == 0 {
		opts.VerifyBeforeHeaders = DefaultVerifyBeforeHeaders
	}
	h := &Handler{pull: svc, opts: opts, log: opts.Log, metrics: opts.Metrics, access: opts.Access}
	r := chi.NewRouter()
	r.Use(apiVersion, h.Observe)
	r.Get("/v2/", h.base)
	r.Head("/v2/", h.base)
	r.HandleFunc("/v2", func(w http.ResponseWriter, r *http.Request) {
		// As distribution's router answers it (gorilla/mux StrictSlash):
		// 301 to /v2/ for any method, the query (containerd's ?ns=) kept.
		u := url.URL{Path: "/v2/", RawQuery: r.URL.RawQuery}
		http.Redirect(w, r, u.String(), http.StatusMovedPermanently)
	})
	r.HandleFunc("/v2/*", h.dispatch)
	// Paths outside the registry API (/foo, /admin/v2/): distribution
	// answers a text/plain 404 there; the mirror answers every error in
	// the OCI envelope, with the admin API's code for an unknown endpoint.
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		ocierr.Write(w, http.StatusNotFound, ocierr.New("NOT_FOUND",
			"no such endpoint: "+r.URL.Path+" (this mirror serves the registry API under /v2/ and its admin API under /admin/v1/)"))
	})
	// Methods chi does not know (FOO, ...) land here: answer like the others.
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, newAPIError(errcode.ErrorCodeUnsupported, "this mirror is read-only: "+r.Method+" is not supported"))
	})
	h.router = r
	return h
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.router.ServeHTTP(w, r) }

func apiVersion(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		next.ServeHTTP(w, r)
	})
}

// routeInfo is what the handlers tell the observe middleware (metrics and
// the access log) about a request.
type routeInfo struct {
	route string
	user  string // the authenticated client, for the pull history
	repo  string // the repository asked for, once its name is valid
	ref   string // its tag or digest
	cache string // metrics.Hit or metrics.Miss for manifests and blobs
	// upstream is the registry name of the repository's upstream, once
	// routed (the metrics' upstream label).
	upstream string
}

type routeKey struct{}

func setRoute(r *http.Request, route string) {
	if ri, ok := r.Context().Value(routeKey{}).(*routeInfo); ok {
		ri.route = route
	}
}

// cacheResult records a manifest or blob answer as a cache hit or miss,
// for the metrics and the access log.
func (h *Handler) cacheResult(r *http.Request, kind, result string, bytes int64) {
	ri, ok := r.Context().Value(routeKey{}).(*routeInfo)
	if !ok {
		return
	}
	ri.cache = result
	h.metrics.CacheResult(ri.upstream, kind, result, bytes)
}

// Observe counts each request by route kind, method and status class, and
// writes the access log line "request" (at info level with
// Options.AccessLog, else at debug): method, route kind, repository and
// reference (tag or digest) when the path names them (else the path),
// status, body bytes sent, duration, cache (hit or miss) for manifests and
// blobs, ns (containerd's ?ns= registry name) when given, and client: the
// authenticated user, else the client's IP address (tracking.ClientOf).
// Never the rest of the
// query, a header, credential, token or redirect URL. The registry API's
// router uses it for every request; outside it, it counts and logs what
// next answers (route "other", the path, the client's address): the token
// endpoint and the refusals of RejectDotSegments.
func (h *Handler) Observe(next http.Handler) http.Handler {
	level := slog.LevelDebug
	if h.opts.AccessLog {
		level = slog.LevelInfo
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ri := &routeInfo{route: metrics.RouteOther}
		r = r.WithContext(context.WithValue(r.Context(), routeKey{}, ri))
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		defer func() {
			status := ww.Status()
			if status == 0 {
				status = http.StatusOK
			}
			d := time.Since(start)
			h.metrics.Request(ri.route, r.Method, status, d.Seconds())
			if !h.log.Enabled(r.Context(), level) {
				return
			}
			attrs := make([]slog.Attr, 0, 10)
			attrs = append(attrs, slog.String("method", r.Method), slog.String("route", ri.route))
			if ri.repo != "" {
				attrs = append(attrs, slog.String("repository", ri.repo))
				if ri.ref != "" {
					attrs = append(attrs, slog.String("reference", ri.ref))
				}
			} else {
				attrs = append(attrs, slog.String("path", r.URL.Path))
			}
			attrs = append(attrs, slog.Int("status", status), slog.Int("bytes", ww.BytesWritten()), slog.Duration("duration", d))
			if ri.cache != "" {
				attrs = append(attrs, slog.String("cache", ri.cache))
			}
			if ns := r.URL.Query().Get("ns"); ns != "" {
				attrs = append(attrs, slog.String("ns", ns)) // containerd's mirror query: a registry name
			}
			attrs = append(attrs, slog.String("client", tracking.ClientOf(r, ri.user)))
			h.log.LogAttrs(r.Context(), level, "request", attrs...)
		}()
		next.ServeHTTP(ww, r)
	})
}

// base answers GET /v2/: the API version check (OCI distribution spec,
// "Determining Support").
func (h *Handler) base(w http.ResponseWriter, r *http.Request) {
	setRoute(r, metrics.RouteBase)
	if h.access != nil && h.access.Mode() != access.ModeNone {
		// Clients learn the auth scheme here: Docker pings /v2/ without
		// credentials and keeps the challenge for the whole pull, and
		// docker login checks its credentials here. A token, anonymous
		// ones included, is a completed login.
		id, err := h.access.Authenticate(r)
		if err != nil || (id.Anonymous() && !access.Bearer(r)) {
			h.unauthorized(w, r, "", "authentication required")
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte("{}"))
}

// route is a parsed /v2/<name>/<verb>/<ref> request.
type route struct {
	kind kind
	name string
	ref  string // tag or digest (manifests), digest (blobs), "" (tags)
}

// parseRoute splits the path after /v2/ from the right, so that names of any
// depth (org/team/image) work and a name component may itself be
// "manifests" or "blobs".
func parseRoute(rest string) (route, bool) {
	if name, ok := strings.CutSuffix(rest, "/tags/list"); ok {
		return route{kind: kindTags, name: name}, name != ""
	}
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 {
		return route{}, false
	}
	ref := rest[i+1:]
	j := strings.LastIndexByte(rest[:i], '/')
	if j <= 0 {
		return route{}, false
	}
	switch rest[j+1 : i] {
	case "manifests":
		return route{kind: kindManifest, name: rest[:j], ref: ref}, true
	case "blobs":
		return route{kind: kindBlob, name: rest[:j], ref: ref}, true
	}
	return route{}, false
}

func (h *Handler) dispatch(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, newAPIError(errcode.ErrorCodeUnsupported, "this mirror is read-only: "+r.Method+" is not supported"))
		return
	}
	// A RawPath means the client percent-encoded something that decodes to
	// a different path (such as %2F): never a valid name.
	if r.URL.RawPath != "" {
		writeError(w, newAPIError(errcode.ErrorCodeNameInvalid, "percent-encoded characters are not allowed in repository names"))
		return
	}
	if r.URL.Path == "/v2/_catalog" {
		// The catalog is an optional part of the registry API (distribution's
		// "Listing Repositories"; not in the OCI distribution spec). A
		// pull-through mirror knows only what was pulled, not the upstream's
		// repositories, so it has none rather than a misleading partial one.
		e := newAPIError(errcode.ErrorCodeUnsupported, "this mirror has no catalog: it pulls through from "+h.pull.Registry()+
			" and cannot list its repositories; list a repository's tags with GET /v2/REPOSITORY/tags/list")
		e.status = http.StatusNotFound
		writeError(w, e)
		return
	}
	rt, ok := parseRoute(strings.TrimPrefix(r.URL.Path, "/v2/"))
	if !ok {
		e := newAPIError(errcode.ErrorCodeUnsupported, "unknown registry API endpoint")
		e.status = http.StatusNotFound
		writeError(w, e)
		return
	}
	if err := validateName(rt.name); err != nil {
		writeError(w, err)
		return
	}
	// The upstream and the name the cache, the access rules and the pull
	// history know the repository by (upstream.Set.Route).
	reg, repo, err := h.pull.Upstreams().Route(h.ns(r), r.Host, rt.name)
	if err != nil {
		writeError(w, newAPIError(errcode.ErrorCodeNameUnknown, strings.TrimPrefix(err.Error(), upstream.ErrNameUnknown.Error()+": ")))
		return
	}
	if ri, ok := r.Context().Value(routeKey{}).(*routeInfo); ok {
		ri.repo, ri.ref, ri.upstream = repo, rt.ref, reg.Name
		if h.pull.Upstreams().IsDefault(reg) {
			ri.upstream = metrics.DefaultUpstream // the metrics' name of the default upstream
		}
	}
	if h.access != nil && !h.authorize(w, r, repo) {
		return
	}
	setRoute(r, map[kind]string{kindManifest: metrics.RouteManifest, kindBlob: metrics.RouteBlob, kindTags: metrics.RouteTags}[rt.kind])
	switch rt.kind {
	case kindManifest:
		h.serveManifest(w, r, repo, rt.ref)
	case kindBlob:
		dgst, err := digest.Parse(rt.ref)
		if err != nil {
			writeError(w, newAPIError(errcode.ErrorCodeDigestInvalid, "invalid blob digest"))
			return
		}
		h.serveBlob(w, r, repo, dgst)
	case kindTags:
		h.serveTags(w, r, rt.name, repo)
	}
}

// authorize applies the access policy to a request for repository name,
// before any cache lookup, so that a refusal is the same whether or not the
// content is cached. It writes the 401 or 403 and returns false when the
// request may not go on.
func (h *Handler) authorize(w http.ResponseWriter, r *http.Request, name string) bool {
	id, err := h.access.Authenticate(r)
	if err != nil {
		h.unauthorized(w, r, name, "invalid credentials")
		return false
	}
	switch err := h.access.Authorize(r.Context(), id, name); {
	case err == nil:
		if ri, ok := r.Context().Value(routeKey{}).(*routeInfo); ok && id.User != auth.DefaultUsername {
			ri.user = id.User // not NGC's literal "$oauthtoken" of a pass-through client
		}
		return true
	case errors.Is(err, access.ErrUnauthenticated):
		h.unauthorized(w, r, name, "authentication required")
	case errors.Is(err, access.ErrUnavailable):
		h.log.Warn("pass-through access check failed", "user", id.User, "repository", name, "err", err)
		writeError(w, newAPIError(errcode.ErrorCodeUnavailable, "the upstream registry could not confirm access; retry later"))
	default:
		h.log.Info("pull denied", "user", id.User, "repository", name, "err", err)
		writeError(w, newAPIError(errcode.ErrorCodeDenied, "requested access to the resource is denied: "+access.DeniedReason(err)))
	}
	return false
}

// unauthorized answers 401 UNAUTHORIZED with the policy's challenge.
func (h *Handler) unauthorized(w http.ResponseWriter, r *http.Request, name, msg string) {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	w.Header().Set("WWW-Authenticate", h.access.Challenge(scheme+"://"+r.Host, name))
	writeError(w, newAPIError(errcode.ErrorCodeUnauthorized, msg))
}

// validateName checks a repository name against the distribution/reference
// grammar (lower-case path components separated by '/') and its
// 255-character limit.
func validateName(name string) *apiError {
	if len(name) > reference.NameTotalLengthMax {
		return newAPIError(errcode.ErrorCodeNameInvalid, "repository name is too long")
	}
	if !names.ValidRepository(name) {
		return newAPIError(errcode.ErrorCodeNameInvalid, "invalid repository name")
	}
	return nil
}

// ns returns containerd's mirror query ?ns=<registry> ("" when absent),
// an Options.NSAliases entry read as the default upstream's name. It
// selects the upstream and is never part of a cache key.
func (h *Handler) ns(r *http.Request) string {
	ns := r.URL.Query().Get("ns")
	for _, a := range h.opts.NSAliases {
		if strings.EqualFold(ns, a) {
			return h.pull.Registry()
		}
	}
	return ns
}
