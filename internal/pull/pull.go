// Package pull is the mirror's pull-through service, apart from HTTP: it
// answers "give me this manifest, this blob, these tags" from the cache,
// or from the upstream registry on a miss, and keeps the cache right while
// doing so.
//
// It owns the rules of a pull-through cache:
//
//   - freshness: a tag confirmed by the upstream within TagFreshness is
//     served from the cache; an older one is revalidated (HEAD, then GET
//     when the digest moved);
//   - stale-if-error: when the upstream is unreachable, failing (5xx) or
//     rate limiting, a cached tag (and the cached tag list) is served;
//   - fills: a blob miss joins the one download of that digest
//     (internal/fill), or starts it; a blob the cache cannot take is
//     streamed from the upstream, verified, without being cached;
//   - leases: a blob being read is leased from eviction (CacheTracker) and
//     every hit is reported for the LRU order;
//   - links: with CheckLinks, content cached under one repository is
//     served under another only once the upstream confirmed that the other
//     holds it too (storage links).
//
// internal/proxy puts the OCI Distribution HTTP API on top; internal/prefetch
// and internal/admin call the same methods, so that a prefetch and a client
// pull of one blob make one upstream fetch.
package pull

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
	"github.com/ngc-mirror/ngc-mirror/internal/fill"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
	"github.com/ngc-mirror/ngc-mirror/internal/upstream"
)

// Store is what the service needs of the cache (*storage.Store).
type Store interface {
	StatBlob(ctx context.Context, dgst digest.Digest) (int64, error)
	LookupBlob(ctx context.Context, dgst digest.Digest) (*storage.CachedBlob, error)
	BlobURL(r *http.Request, dgst digest.Digest) (string, error)
	GetManifest(ctx context.Context, dgst digest.Digest) (*storage.Manifest, error)
	PutManifest(ctx context.Context, mediaType string, dgst digest.Digest, body []byte) error
	GetTag(ctx context.Context, repo storage.Repo, tag string) (storage.TagRecord, error)
	PutTag(ctx context.Context, repo storage.Repo, tag string, rec storage.TagRecord) error
	DeleteTag(ctx context.Context, repo storage.Repo, tag string) error
	ListTags(ctx context.Context, repo storage.Repo) ([]string, error)
	GetTagList(ctx context.Context, repo storage.Repo) (storage.TagList, error)
	PutTagList(ctx context.Context, repo storage.Repo, tl storage.TagList) error
	PutLinks(ctx context.Context, repo storage.Repo, dgsts ...digest.Digest) error
	HasLink(ctx context.Context, repo storage.Repo, dgst digest.Digest) (bool, error)
}

// CacheTracker follows cache use for eviction (*evict.Evictor, or
// evict.Unlimited without a budget).
type CacheTracker interface {
	// Touch records an access to a cached object. It must be cheap: it
	// runs on every hit.
	Touch(kind storage.Kind, dgst digest.Digest)
	// Lease keeps blob dgst in the cache until release is called; an
	// error (ctx ended) means the request is abandoned.
	Lease(ctx context.Context, dgst digest.Digest) (release func(), err error)
}

// Options configure a Service. Zero values take the defaults noted.
type Options struct {
	// TagFreshness is how long a tag → digest mapping confirmed by the
	// upstream is served without asking again (default 5 minutes).
	TagFreshness time.Duration
	// UpstreamTimeout bounds one upstream manifest, tag-list or blob HEAD
	// exchange, token included (default 30 s). Blob bodies are bounded by
	// the fill's idle timeout instead.
	UpstreamTimeout time.Duration
	// CheckLinks serves cached content under a repository only when it is
	// known to belong to it (see Service.Blob). Set it whenever clients
	// are not all allowed everything (an access policy is in force).
	CheckLinks bool
	// Redirect makes Blob.RedirectURL offer the storage's presigned URL
	// of a cached blob (S3), so that bytes flow from the store to the
	// client.
	Redirect bool
	// TagListMaxPages bounds the upstream pages merged for a tag list
	// asked without n (default upstream.MaxTagPages: 100 pages, 10,000
	// tags at nvcr.io's 100 a page). A list cut there is answered with
	// TagPage.More, so that the rest is one request away.
	TagListMaxPages int
	// Cache is told of every hit and leases blobs being read (default:
	// nothing to tell).
	Cache CacheTracker
	// Leases, when set, makes a manifest fetch once across the replicas
	// that share this cache and the state store (*state.Redis): see
	// Service.Manifest. LeaseScope names the shared cache in the lease
	// names (replicas on other caches sharing the store never wait on each
	// other). nil: this process alone (fetches are still one per process).
	Leases     Leases
	LeaseScope string
	// Cluster, when set (scale-out, cluster.advertise), decides whether a
	// fill fetches from the upstream as the blob's owner or streams from
	// the replica that owns it (see internal/cluster).
	Cluster Cluster
	Log     *slog.Logger
}

// Service is the pull-through cache. Build it with New; it is safe for
// concurrent use.
type Service struct {
	ups       *upstream.Set
	store     Store
	fills     *fill.Group
	opts      Options
	log       *slog.Logger
	cache     CacheTracker
	manifests singleflight.Group // one upstream manifest exchange per repo:ref
	redirects *redirectHolds     // leases kept for presigned URLs handed out
	owner     string             // this replica in manifest leases
}

// New returns the service over one upstream client (the default upstream,
// named by its host), the cache and its fill group.
func New(up *upstream.Client, store Store, fills *fill.Group, opts Options) *Service {
	return NewSet(upstream.Single(up), store, fills, opts)
}

// NewSet returns the service over the upstreams ups, the cache and its fill
// group. Every method takes repositories by their qualified names
// (names.QualifiedName: nvidia/pytorch on the default upstream,
// docker.io/library/ubuntu on another); a name no upstream serves is
// answered with an error wrapping upstream.ErrNameUnknown before any
// cache or upstream request. Blobs and manifests are shared by digest;
// tag records, tag lists and links are kept per upstream
// (storage.Repo.Registry). Each upstream's TagFreshness overrides
// Options.TagFreshness.
func NewSet(ups *upstream.Set, store Store, fills *fill.Group, opts Options) *Service {
	if opts.TagFreshness <= 0 {
		opts.TagFreshness = 5 * time.Minute
	}
	if opts.UpstreamTimeout <= 0 {
		opts.UpstreamTimeout = 30 * time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Cache == nil {
		opts.Cache = noTracker{}
	}
	if opts.TagListMaxPages <= 0 {
		opts.TagListMaxPages = upstream.MaxTagPages
	}
	return &Service{ups: ups, store: store, fills: fills, opts: opts, log: opts.Log, cache: opts.Cache,
		redirects: newRedirectHolds(), owner: replicaOwner()}
}

// RegistryName is the name of up's registry: its URL's host[:port] in
// lower case ("nvcr.io"). It keys tag records and links in the cache.
func RegistryName(up *upstream.Client) string { return strings.ToLower(up.Host()) }

// Registry is the name of the default upstream registry (RegistryName of
// its client).
func (s *Service) Registry() string { return s.ups.Default().Name }

// Upstreams returns the set of upstreams the service pulls from.
func (s *Service) Upstreams() *upstream.Set { return s.ups }

// at returns the upstream of qualified name repo and the path on it. Every
// exported method has checked repo with Split first; a name that would fail
// resolves to the default upstream's registry never reached.
func (s *Service) at(repo string) (*upstream.Registry, string) {
	r, path, err := s.ups.Split(repo)
	if err != nil {
		return s.ups.Default(), repo
	}
	return r, path
}

// client returns the upstream client of qualified name repo.
func (s *Service) client(repo string) *upstream.Client {
	r, _ := s.at(repo)
	return r.Client
}

// path returns qualified name repo's path on its upstream.
func (s *Service) path(repo string) string {
	_, p := s.at(repo)
	return p
}

// freshness returns the tag freshness of repo's upstream.
func (s *Service) freshness(repo string) time.Duration {
	if r, _ := s.at(repo); r.TagFreshness > 0 {
		return r.TagFreshness
	}
	return s.opts.TagFreshness
}

// repo is the cache's key of the repository with qualified name name: its
// upstream's registry name and its path there.
func (s *Service) repo(name string) storage.Repo {
	r, p := s.at(name)
	return storage.Repo{Registry: r.Name, Name: p}
}

type noTracker struct{}

func (noTracker) Touch(storage.Kind, digest.Digest) {}
func (noTracker) Lease(context.Context, digest.Digest) (func(), error) {
	return func() {}, nil
}

// upstreamContext detaches an upstream exchange from one caller's
// cancellation (others may share it) and bounds it.
func (s *Service) upstreamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s.opts.UpstreamTimeout)
}

// IsAuthoritative reports whether err is the upstream's own answer about
// the content (not found, access refused), as opposed to an outage, during
// which stale cached content may still be served.
func IsAuthoritative(err error) bool {
	var te *auth.TokenError
	return errors.Is(err, upstream.ErrNotFound) || errors.Is(err, upstream.ErrUnauthorized) || errors.Is(err, upstream.ErrNameUnknown) ||
		errors.Is(err, upstream.ErrDenied) ||
		(errors.As(err, &te) && te.StatusCode >= 400 && te.StatusCode < 500 && te.StatusCode != http.StatusTooManyRequests)
}

// errNotHeld is what a link check answers for content the repository does
// not hold: the same as for content that does not exist.
var errNotHeld = &upstream.Error{StatusCode: http.StatusNotFound}

// ErrBusy is returned by Blob when a fill bound is reached (limits.max_fills
// downloads, or the blob's upstream's bound, run already) and none of them
// is of the blob asked: retry shortly. The error is a *BusyError.
var ErrBusy = fill.ErrTooManyFills

// BusyError is ErrBusy naming the bound that was reached, as the
// configuration spells it: "limits.max_fills" (all upstreams together),
// "upstream.max_fills" (the default upstream's) or
// "upstreams.<name>.max_fills".
type BusyError struct {
	Bound string
}

func (e *BusyError) Error() string {
	return "pull: too many blob downloads in progress (" + e.Bound + ")"
}

// Unwrap makes a BusyError ErrBusy.
func (e *BusyError) Unwrap() error { return ErrBusy }

// ErrGone is returned by Blob.Open when the blob was removed (gc, another
// replica) each time it was about to be read: retry.
var ErrGone = errors.New("pull: the blob was removed while being served")

// ErrNotCached is returned by CacheBlob when the blob was fetched and
// verified but the cache could not keep it (disk trouble, budget full).
var ErrNotCached = errors.New("pull: blob could not be cached")
