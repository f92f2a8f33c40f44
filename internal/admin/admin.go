// Package admin is the mirror's management API under /admin/v1/, a prefix
// registry clients never use: tracked repositories and tags, prefetch jobs
// and rules, the pull history. Every request needs the admin token as
// "Authorization: Bearer <token>". Errors use the OCI error envelope
// {"errors":[{"code","message"}]} with codes of the registry API where one
// fits (NAME_INVALID, NAME_UNKNOWN, MANIFEST_UNKNOWN, TAG_INVALID, DENIED,
// UNAUTHORIZED, UNAVAILABLE) and RULE_INVALID, PLATFORM_INVALID,
// JOB_UNKNOWN, JOB_ENDED, BAD_REQUEST for this API's own.
package admin

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/manifest"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctag"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/prefetch"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
	"github.com/ngc-mirror/ngc-mirror/internal/tracking"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Prefix is where the API is mounted.
const Prefix = "/admin/v1"

// Options configure the API.
type Options struct {
	// Token is the bearer token every request must carry. Empty refuses
	// every request.
	Token string
	// UpstreamHosts are registry hosts a client may put in front of an
	// image name ("nvcr.io/nvidia/pytorch:24.05-py3"); they are dropped.
	UpstreamHosts []string
	// Upstreams are the further upstreams' registry names: an image that
	// begins with one keeps it (docker.io/library/python:3.12).
	Upstreams []string
	// PrefetchDisabled refuses POST prefetch: no scheduler runs jobs in
	// this process (prefetch.enabled: false) and, with the embedded store,
	// none ever would.
	PrefetchDisabled bool
	Log              *slog.Logger
	Metrics          *metrics.Tracking
}

// Puller is what the API needs of the pull-through service (*pull.Service).
type Puller interface {
	// Manifest resolves and caches repo's manifest for ref (tag or digest).
	Manifest(ctx context.Context, repo, ref string) (pull.Manifest, error)
	// CachedManifest returns manifest dgst if the cache holds it.
	CachedManifest(ctx context.Context, dgst digest.Digest) (pull.Manifest, error)
	// BlobCached reports whether blob dgst is in the cache.
	BlobCached(ctx context.Context, dgst digest.Digest) bool
	// Blob opens blob dgst of repo, fetching it on a miss.
	Blob(ctx context.Context, repo string, dgst digest.Digest) (*pull.Blob, error)
}

// Server is the admin API handler.
type Server struct {
	sched   *prefetch.Scheduler
	tracker *tracking.Tracker
	store   state.Store
	pull    Puller
	opts    Options
	router  chi.Router
}

// New returns the API handler (mount it at Prefix; it routes full paths).
func New(sched *prefetch.Scheduler, tracker *tracking.Tracker, puller Puller, opts Options) *Server {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{sched: sched, tracker: tracker, store: tracker.Store(), pull: puller, opts: opts}
	r := chi.NewRouter()
	r.Use(s.authenticate)
	r.Get(Prefix+"/repositories", s.repositories)
	r.Get(Prefix+"/tags", s.tags)
	r.Post(Prefix+"/prefetch", s.prefetch)
	r.Get(Prefix+"/jobs", s.jobs)
	r.Get(Prefix+"/jobs/{id}", s.job)
	r.Post(Prefix+"/jobs/{id}/cancel", s.cancelJob)
	r.Get(Prefix+"/rules", s.rules)
	r.Get(Prefix+"/pulls", s.pulls)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "NOT_FOUND", "no such admin endpoint: "+r.Method+" "+r.URL.Path)
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", r.Method+" is not supported on "+r.URL.Path)
	})
	s.router = r
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.router.ServeHTTP(w, r) }

func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || s.opts.Token == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(s.opts.Token)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="ngc-mirror admin"`)
			writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "the admin API needs the admin token (Authorization: Bearer <token>)")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// writeError answers the OCI error envelope {"errors":[{"code","message"}]}
// (indented like every answer of this API).
func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, ocierr.New(code, msg))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.MarshalIndent(v, "", "  ")
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// stateFailed answers 503 for a state store that did not answer.
func (s *Server) stateFailed(w http.ResponseWriter, err error) {
	s.opts.Metrics.StateError(metrics.OpAPI)
	s.opts.Log.Warn("admin API: state store failed", "err", err)
	writeError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "the state store (Redis or the embedded file) is unavailable; retry later")
}

// upstreamFailed maps an upstream error for what: "manifest", "blob" or
// "repository NAME" (it names the thing in the message).
func upstreamFailed(w http.ResponseWriter, err error, what string) {
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		code := "NAME_UNKNOWN"
		if what == "manifest" {
			code = "MANIFEST_UNKNOWN"
		}
		writeError(w, http.StatusNotFound, code, what+" unknown to the upstream registry")
	case errors.Is(err, upstream.ErrDenied), errors.Is(err, upstream.ErrUnauthorized):
		// Docker Hub and others answer an unknown repository so too.
		writeError(w, http.StatusForbidden, "DENIED", "the upstream registry refused the mirror access to "+what+
			": it does not exist there, or the mirror's upstream credentials do not cover it")
	default:
		writeError(w, http.StatusBadGateway, "UNAVAILABLE", "the upstream registry could not answer: "+err.Error())
	}
}

// RepositoryInfo is one entry of GET /admin/v1/repositories.
type RepositoryInfo struct {
	state.Repository
	Tracked bool `json:"tracked"` // polled on the schedule
	Tags    int  `json:"tags"`
}

func (s *Server) repositories(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	repos, err := s.store.Repositories(ctx)
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	tracked := s.tracker.TrackedOf(repos)
	byName := map[string]*RepositoryInfo{}
	for _, rp := range repos {
		byName[rp.Name] = &RepositoryInfo{Repository: rp}
	}
	for _, n := range tracked {
		if byName[n] == nil {
			byName[n] = &RepositoryInfo{Repository: state.Repository{Name: n}}
		}
		byName[n].Tracked = true
	}
	out := make([]RepositoryInfo, 0, len(byName))
	for _, ri := range byName {
		tags, err := s.store.Tags(ctx, ri.Name)
		if err != nil {
			s.stateFailed(w, err)
			return
		}
		ri.Tags = len(tags)
		out = append(out, *ri)
	}
	slices.SortFunc(out, func(a, b RepositoryInfo) int { return strings.Compare(a.Name, b.Name) })
	writeJSON(w, http.StatusOK, map[string]any{"repositories": out})
}

// TagInfo is one entry of GET /admin/v1/tags.
type TagInfo struct {
	state.Tag
	Monthly bool   `json:"monthly"`
	Release string `json:"release,omitempty"`
	Variant string `json:"variant,omitempty"`
	// Cached: "full" (the manifest and every platform's manifest and
	// blobs), "partial" (some of it), "no", or "unknown" (digest not
	// resolved yet).
	Cached          string   `json:"cached"`
	CachedPlatforms []string `json:"cached_platforms,omitempty"`
}

// tags answers GET /admin/v1/tags?repository=<name>[&monthly=true][&refresh=true].
// A repository never polled is polled first (so a name the upstream does
// not know gets NAME_UNKNOWN); refresh=true polls anyway.
func (s *Server) tags(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	q := r.URL.Query()
	repo := q.Get("repository")
	if repo == "" {
		writeError(w, http.StatusBadRequest, "NAME_INVALID", "query parameter repository is required")
		return
	}
	// The qualified name, as prefetch and pins read it: nvcr.io/ dropped,
	// docker.io/ubuntu is docker.io/library/ubuntu.
	repo, err := names.ParseRepository(repo, s.opts.UpstreamHosts, s.opts.Upstreams...)
	if err != nil {
		writeError(w, http.StatusBadRequest, "NAME_INVALID", err.Error())
		return
	}
	monthly, err1 := boolParam(q, "monthly")
	refresh, err2 := boolParam(q, "refresh")
	if err := errors.Join(err1, err2); err != nil {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", err.Error())
		return
	}
	tags, err := s.store.Tags(ctx, repo)
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	if len(tags) == 0 || refresh {
		if _, err := s.tracker.Poll(ctx, repo); err != nil {
			if errors.Is(err, tracking.ErrState) {
				s.stateFailed(w, err)
			} else {
				upstreamFailed(w, err, "repository "+repo)
			}
			return
		}
		if tags, err = s.store.Tags(ctx, repo); err != nil {
			s.stateFailed(w, err)
			return
		}
	}
	out := make([]TagInfo, 0, len(tags))
	view := s.newCacheView()
	for _, t := range tags {
		p := ngctag.Parse(t.Name)
		if monthly && !p.Monthly {
			continue
		}
		ti := TagInfo{Tag: t, Monthly: p.Monthly, Release: p.Release, Variant: p.Variant}
		ti.Cached, ti.CachedPlatforms = view.tag(ctx, t)
		out = append(out, ti)
	}
	writeJSON(w, http.StatusOK, map[string]any{"repository": repo, "tags": out})
}

// cacheView answers how much of an image the cache holds, remembering
// each answer for one request: tags share digests (latest and its
// release), and releases and variants share layers.
type cacheView struct {
	s      *Server
	tags   map[digest.Digest]cachedAnswer
	images map[digest.Digest]bool // image manifest → it and all its blobs cached
	blobs  map[digest.Digest]bool
}

type cachedAnswer struct {
	state     string
	platforms []string
}

func (s *Server) newCacheView() *cacheView {
	return &cacheView{s: s, tags: map[digest.Digest]cachedAnswer{}, images: map[digest.Digest]bool{}, blobs: map[digest.Digest]bool{}}
}

// tag says how much of a tag's image the cache holds: "full", "partial"
// (the index and some platforms), "no", or "unknown" (digest not resolved).
func (v *cacheView) tag(ctx context.Context, t state.Tag) (string, []string) {
	d, err := digest.Parse(t.Digest)
	if err != nil {
		return "unknown", nil
	}
	if a, ok := v.tags[d]; ok {
		return a.state, a.platforms
	}
	a := v.compute(ctx, d)
	v.tags[d] = a
	return a.state, a.platforms
}

func (v *cacheView) compute(ctx context.Context, d digest.Digest) cachedAnswer {
	m, err := v.s.pull.CachedManifest(ctx, d)
	if err != nil {
		return cachedAnswer{state: "no"}
	}
	if !manifest.IsIndex(m.MediaType) {
		if v.imageBlobs(ctx, m.Body) {
			return cachedAnswer{state: "full"}
		}
		return cachedAnswer{state: "partial"}
	}
	children, _ := manifest.Children(m.Body)
	var cached []string
	total := 0
	for _, c := range children {
		p := c.PlatformString()
		if p == "" {
			continue
		}
		total++
		if v.image(ctx, c.Digest) {
			cached = append(cached, p)
		}
	}
	if total > 0 && len(cached) == total {
		return cachedAnswer{state: "full", platforms: cached}
	}
	return cachedAnswer{state: "partial", platforms: cached} // the index is cached
}

// image reports whether image manifest d and all its blobs are cached.
func (v *cacheView) image(ctx context.Context, d digest.Digest) bool {
	ok, seen := v.images[d]
	if !seen {
		m, err := v.s.pull.CachedManifest(ctx, d)
		ok = err == nil && v.imageBlobs(ctx, m.Body)
		v.images[d] = ok
	}
	return ok
}

func (v *cacheView) imageBlobs(ctx context.Context, body []byte) bool {
	refs, err := manifest.References(body)
	if err != nil {
		return false
	}
	for _, r := range refs {
		ok, seen := v.blobs[r.Digest]
		if !seen {
			ok = v.s.pull.BlobCached(ctx, r.Digest)
			v.blobs[r.Digest] = ok
		}
		if !ok {
			return false
		}
	}
	return true
}

// PrefetchRequest is the body of POST /admin/v1/prefetch: one of image
// (with platforms), rule (a configured rule's name, run now) or spec (an
// ad hoc rule, run once).
type PrefetchRequest struct {
	Image     string             `json:"image,omitempty"`
	Platforms []string           `json:"platforms,omitempty"`
	Rule      string             `json:"rule,omitempty"`
	Spec      *prefetch.RuleSpec `json:"spec,omitempty"`
}

// prefetch answers POST /admin/v1/prefetch with 202 and the jobs queued
// (or already queued or running for the same image and platforms).
func (s *Server) prefetch(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	if s.opts.PrefetchDisabled {
		writeError(w, http.StatusConflict, "UNSUPPORTED", "prefetch is disabled on this mirror (prefetch.enabled: false)")
		return
	}
	var req PrefetchRequest
	if !decodeBody(w, r, &req) {
		return
	}
	set := 0
	for _, b := range []bool{req.Image != "", req.Rule != "", req.Spec != nil} {
		if b {
			set++
		}
	}
	if set != 1 {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "give exactly one of image, rule or spec")
		return
	}
	var jobs []state.Job
	switch {
	case req.Image != "":
		repo, ref, err := ParseImage(req.Image, s.opts.UpstreamHosts, s.opts.Upstreams...)
		if err != nil {
			code := "NAME_INVALID"
			switch {
			case errors.Is(err, names.ErrTagInvalid):
				code = "TAG_INVALID"
			case errors.Is(err, names.ErrDigestInvalid):
				code = "DIGEST_INVALID"
			}
			writeError(w, http.StatusBadRequest, code, err.Error())
			return
		}
		for _, p := range req.Platforms {
			if !names.ValidPlatform(p) {
				writeError(w, http.StatusBadRequest, "PLATFORM_INVALID", "platform "+strconv.Quote(p)+": want os/arch[/variant], like linux/amd64")
				return
			}
		}
		// Resolve now so that an unknown image is an error here, not a
		// failed job later; this also caches the manifest.
		uctx, cancel := context.WithTimeout(ctx, time.Minute)
		m, err := s.pull.Manifest(uctx, repo, ref)
		cancel()
		if err != nil {
			upstreamFailed(w, err, "manifest")
			return
		}
		mt, body := m.MediaType, m.Body
		if len(req.Platforms) > 0 {
			var have []string
			if manifest.IsIndex(mt) {
				children, _ := manifest.Children(body)
				for _, c := range children {
					if p := c.PlatformString(); p != "" {
						have = append(have, p)
					}
				}
			} else if p, err := s.imagePlatform(ctx, repo, body); err != nil {
				upstreamFailed(w, err, "blob")
				return
			} else {
				have = []string{p}
			}
			if missing := missingPlatforms(have, req.Platforms); len(missing) > 0 {
				writeError(w, http.StatusBadRequest, "PLATFORM_INVALID", fmt.Sprintf("%s has no image for %v (it has %v)", req.Image, missing, have))
				return
			}
		}
		j, _, err := s.sched.Enqueue(ctx, prefetch.Target{Repository: repo, Reference: ref, Platforms: req.Platforms})
		if err != nil {
			s.stateFailed(w, err)
			return
		}
		jobs = append(jobs, j)
	default:
		var rule *prefetch.Rule
		if req.Rule != "" {
			for _, ru := range s.sched.Rules() {
				if ru.Name == req.Rule {
					rule = ru
				}
			}
			if rule == nil {
				writeError(w, http.StatusNotFound, "RULE_UNKNOWN", "no configured prefetch rule named "+strconv.Quote(req.Rule))
				return
			}
		} else {
			if req.Spec.Name == "" {
				req.Spec.Name = "adhoc"
			}
			for _, ru := range s.sched.Rules() {
				if ru.Name == req.Spec.Name {
					writeError(w, http.StatusBadRequest, "RULE_INVALID", "spec name "+strconv.Quote(ru.Name)+" is a configured rule's; run it with {\"rule\": ...} or pick another name")
					return
				}
			}
			// The checks Load makes of prefetch.rules, then Compile's.
			if errs := config.RuleRepositories("spec.repositories", req.Spec.Repositories, s.opts.UpstreamHosts, s.opts.Upstreams); len(errs) > 0 {
				writeError(w, http.StatusBadRequest, "RULE_INVALID", errors.Join(errs...).Error())
				return
			}
			ru, err := prefetch.Compile(*req.Spec)
			if err != nil {
				writeError(w, http.StatusBadRequest, "RULE_INVALID", err.Error())
				return
			}
			rule = ru
		}
		var err error
		if jobs, err = s.sched.RunRule(ctx, rule); err != nil {
			s.stateFailed(w, err)
			return
		}
	}
	if jobs == nil {
		jobs = []state.Job{} // a rule that selects nothing now
	}
	writeJSON(w, http.StatusAccepted, map[string]any{"jobs": jobs})
}

// maxBody bounds a request body (bytes).
const maxBody = 1 << 20

// decodeBody reads one JSON object into v, strictly: unknown fields,
// trailing data and bodies over maxBody are errors (413 for the last).
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	raw, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if mbe := new(http.MaxBytesError); errors.As(err, &mbe) || len(raw) > maxBody {
		writeError(w, http.StatusRequestEntityTooLarge, "BAD_REQUEST", fmt.Sprintf("body over %d bytes", maxBody))
		return false
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "reading the body: "+err.Error())
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "body: "+err.Error())
		return false
	}
	if dec.More() || dec.InputOffset() < int64(len(bytes.TrimRight(raw, " \t\r\n"))) {
		writeError(w, http.StatusBadRequest, "BAD_REQUEST", "body: data after the JSON object")
		return false
	}
	return true
}

func missingPlatforms(have, want []string) []string {
	var missing []string
	for _, p := range want {
		if !slices.ContainsFunc(have, func(h string) bool { return manifest.MatchPlatform(h, p) }) {
			missing = append(missing, p)
		}
	}
	return missing
}

// imagePlatform reads "os/arch[/variant]" of a single-platform image from
// its config blob (fetched into the cache when missing; it is small).
func (s *Server) imagePlatform(ctx context.Context, repo string, body []byte) (string, error) {
	refs, err := manifest.References(body)
	if err != nil || len(refs) == 0 {
		return "", fmt.Errorf("manifest has no config: %v", err)
	}
	cfg := refs[0].Digest // References lists the config first
	b, err := s.pull.Blob(ctx, repo, cfg)
	if err != nil {
		return "", err
	}
	defer b.Close()
	rd, err := b.Open(0, b.Size)
	if err != nil {
		return "", err
	}
	var c manifest.Platform // an image config's os, architecture, variant
	if err := json.NewDecoder(io.LimitReader(rd, 4<<20)).Decode(&c); err != nil {
		return "", fmt.Errorf("image config: %w", err)
	}
	return c.String(), nil
}

// ParseImage splits "repository:tag" or "repository@digest" (optionally
// prefixed with one of hosts, such as "nvcr.io/", or of others, the further
// upstreams' names, kept in the qualified repository name) into repository and
// reference (the digest when both are given), with names.ParseImage: the
// syntax of cache.pin too. Errors wrap names.ErrTagInvalid or
// names.ErrDigestInvalid for a malformed or missing reference, else
// names.ErrNameInvalid (another registry's host, a name outside the
// distribution grammar).
func ParseImage(image string, hosts []string, others ...string) (repo, ref string, err error) {
	r, err := names.ParseImage(image, hosts, others...)
	if err != nil {
		return "", "", err
	}
	return r.Repository, r.Ref(), nil
}

func (s *Server) jobs(w http.ResponseWriter, r *http.Request) {
	jobs, err := s.store.Jobs(r.Context())
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	if st := r.URL.Query().Get("state"); st != "" {
		if !slices.Contains([]string{state.JobQueued, state.JobRunning, state.JobDone, state.JobFailed, state.JobCancelled}, st) {
			writeError(w, http.StatusBadRequest, "BAD_REQUEST", "state: want queued, running, done, failed or cancelled")
			return
		}
		jobs = slices.DeleteFunc(jobs, func(j state.Job) bool { return j.State != st })
	}
	writeJSON(w, http.StatusOK, map[string]any{"jobs": jobs})
}

func (s *Server) job(w http.ResponseWriter, r *http.Request) {
	j, err := s.store.Job(r.Context(), chi.URLParam(r, "id"))
	if errors.Is(err, state.ErrNotFound) {
		writeError(w, http.StatusNotFound, "JOB_UNKNOWN", "no job "+strconv.Quote(chi.URLParam(r, "id")))
		return
	}
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	writeJSON(w, http.StatusOK, j)
}

// cancelJob answers POST /admin/v1/jobs/<id>/cancel: 200 with the job,
// now cancelled (again 200 for a job cancelled already); 404 JOB_UNKNOWN;
// 409 JOB_ENDED for a job that is done or failed. The replica running the
// job stops it within a progress save (about a second).
func (s *Server) cancelJob(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "id")
	j, err := s.sched.Cancel(r.Context(), id)
	switch {
	case errors.Is(err, state.ErrNotFound):
		writeError(w, http.StatusNotFound, "JOB_UNKNOWN", "no job "+strconv.Quote(id))
	case err != nil:
		s.stateFailed(w, err)
	case j.State != state.JobCancelled:
		writeError(w, http.StatusConflict, "JOB_ENDED", "job "+strconv.Quote(id)+" has ended already ("+j.State+")")
	default:
		writeJSON(w, http.StatusOK, j)
	}
}

// RuleInfo is one entry of GET /admin/v1/rules.
type RuleInfo struct {
	prefetch.RuleSpec
	Next time.Time `json:"next,omitzero"`
}

func (s *Server) rules(w http.ResponseWriter, r *http.Request) {
	out := []RuleInfo{} // "rules": [] when none are configured, not null
	for _, ru := range s.sched.Rules() {
		out = append(out, RuleInfo{RuleSpec: ru.RuleSpec, Next: ru.Next(time.Now())})
	}
	writeJSON(w, http.StatusOK, map[string]any{"rules": out, "leader": s.sched.Leader()})
}

// boolParam reads the boolean query parameter name: absent is false; a
// value strconv.ParseBool does not take (monthly=maybe) is an error naming
// it, never read as false.
func boolParam(q url.Values, name string) (bool, error) {
	v := q.Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%s=%q: want true or false", name, v)
	}
	return b, nil
}

func (s *Server) pulls(w http.ResponseWriter, r *http.Request) {
	n := 100
	if v := r.URL.Query().Get("n"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 || n > state.MaxPullLog {
			writeError(w, http.StatusBadRequest, "BAD_REQUEST", fmt.Sprintf("n: want 1 to %d", state.MaxPullLog))
			return
		}
	}
	pulls, err := s.store.RecentPulls(r.Context(), n)
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	usage, err := s.store.Usage(r.Context(), time.Time{})
	if err != nil {
		s.stateFailed(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"pulls": pulls, "usage": usage})
}
