// Package upstream is the mirror's client for the upstream registry (nvcr.io):
// manifests, blobs and tag lists over the OCI distribution API, through an
// authenticating RoundTripper from package auth.
package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/auth"
)

// MaxManifestSize is the largest manifest the mirror accepts (bytes), the
// same limit CNCF Distribution applies.
const MaxManifestSize = 4 << 20

// ManifestMediaTypes is the Accept list sent when the client gave none: every
// Docker and OCI manifest and index type, so the upstream answers with the
// same bytes that a modern client pulling from it directly gets.
var ManifestMediaTypes = []string{
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// Manifest is a manifest exactly as the upstream served it.
type Manifest struct {
	MediaType string
	Digest    digest.Digest
	Body      []byte
}

// Descriptor describes content without its bytes.
type Descriptor struct {
	MediaType string
	Digest    digest.Digest
	Size      int64 // bytes; -1 when the upstream did not say
}

// Blob is an open upstream blob body. Size is the full blob size in bytes
// (not the remaining length), or -1 when unknown.
type Blob struct {
	Body io.ReadCloser
	Size int64
}

// Client talks to one upstream registry. It is safe for concurrent use.
//
// When the upstream answers 429 with Retry-After, the client sends nothing
// more until that time has passed: each request in between fails at once
// with a 429 *Error whose RetryAfter is the time left (at most
// MaxBackoff).
type Client struct {
	base *url.URL
	hc   *http.Client
	now  func() time.Time
	// OnBackoffRefusal, if set, is called for each request held back.
	OnBackoffRefusal func()
	// OnRequest, if set, is called after each exchange with the kind of
	// request ("manifest", "blob", "tags", "ping"), the final HTTP status
	// (0 for a transport error, -1 when held back by a backoff,
	// StatusNotRegistry for an HTML answer) and the time
	// to response headers.
	OnRequest func(kind string, status int, d time.Duration)
	// OnBytes, if set, is called with the number of body bytes read from
	// each upstream response as they are read.
	OnBytes func(n int)

	mu           sync.Mutex
	backoffUntil time.Time
}

// MaxBackoff caps how long a Retry-After can silence the client.
const MaxBackoff = 10 * time.Minute

// New returns a Client for the registry at base (scheme and host, e.g.
// https://nvcr.io), sending requests through rt. rt should be an
// *auth.Transport for base; redirects (blob GETs go to a CDN) are followed
// by the client and reach rt as new requests, which it leaves
// unauthenticated when they leave the registry's origin.
func New(base *url.URL, rt http.RoundTripper) *Client {
	return &Client{
		base: base,
		now:  time.Now,
		hc: &http.Client{
			Transport: rt,
			CheckRedirect: func(req *http.Request, via []*http.Request) error {
				if len(via) >= 10 {
					return errors.New("upstream: stopped after 10 redirects")
				}
				return nil
			},
		},
	}
}

// Host returns the upstream's host[:port], as containerd names it in ?ns=.
func (c *Client) Host() string { return c.base.Host }

func (c *Client) url(path string, q url.Values) string {
	u := *c.base
	u.Path = strings.TrimSuffix(c.base.Path, "/") + path
	u.RawQuery = q.Encode()
	return u.String()
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, hdr http.Header) (*http.Response, error) {
	c.mu.Lock()
	wait := c.backoffUntil.Sub(c.now())
	c.mu.Unlock()
	kind := requestKind(path)
	if wait > 0 {
		if c.OnBackoffRefusal != nil {
			c.OnBackoffRefusal()
		}
		c.observe(kind, -1, 0)
		return nil, &Error{Method: method, Path: path, StatusCode: http.StatusTooManyRequests, RetryAfter: wait}
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path, q), nil)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", "ngc-mirror")
	start := time.Now()
	resp, err := c.hc.Do(req)
	if err != nil {
		var te *auth.TokenError
		switch {
		case errors.Is(err, auth.ErrTokenNotJSON):
			// The token realm answered with a page, not a token.
			c.observe(kind, StatusNotRegistry, time.Since(start))
			return nil, fmt.Errorf("%w: %w", ErrNotRegistry, scrub(err))
		case errors.As(err, &te):
			c.observe(kind, te.StatusCode, time.Since(start))
		default:
			c.observe(kind, 0, time.Since(start))
		}
		if errors.As(err, &te) && te.StatusCode == http.StatusTooManyRequests {
			// The token realm rate limits: report it as the registry would.
			ue := &Error{Method: method, Path: path, StatusCode: te.StatusCode, RetryAfter: parseRetryAfter(te.RetryAfter, c.now())}
			c.backOff(ue)
			return nil, ue
		}
		return nil, scrub(err)
	}
	if kind != "ping" && isHTML(resp.Header.Get("Content-Type")) {
		// No manifest, blob (also after the CDN redirect) or tag list is
		// ever HTML: this is a portal's or proxy's page.
		c.observe(kind, StatusNotRegistry, time.Since(start))
		drainClose(resp.Body)
		return nil, fmt.Errorf("%w: %s %s answered %d with Content-Type %s", ErrNotRegistry, method, path, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	c.observe(kind, resp.StatusCode, time.Since(start))
	if c.OnBytes != nil {
		resp.Body = &countingBody{ReadCloser: resp.Body, add: c.OnBytes}
	}
	if err := checkResponse(resp, c.now()); err != nil {
		var ue *Error
		if errors.As(err, &ue) {
			c.backOff(ue)
		}
		return nil, err
	}
	return resp, nil
}

// isHTML reports whether a Content-Type value is an HTML page.
func isHTML(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		mt = strings.ToLower(strings.TrimSpace(strings.Split(ct, ";")[0]))
	}
	return mt == "text/html" || mt == "application/xhtml+xml"
}

func (c *Client) observe(kind string, status int, d time.Duration) {
	if c.OnRequest != nil {
		c.OnRequest(kind, status, d)
	}
}

// requestKind names the API call of a registry path for metrics.
func requestKind(path string) string {
	switch {
	case path == "/v2/":
		return "ping"
	case strings.HasSuffix(path, "/tags/list"):
		return "tags"
	case strings.Contains(path, "/manifests/"):
		return "manifest"
	case strings.Contains(path, "/blobs/"):
		return "blob"
	}
	return "other"
}

// countingBody reports the bytes read through it.
type countingBody struct {
	io.ReadCloser
	add func(int)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.add(n)
	}
	return n, err
}

// backOff silences the client for a 429's Retry-After.
func (c *Client) backOff(ue *Error) {
	if ue.StatusCode != http.StatusTooManyRequests || ue.RetryAfter <= 0 {
		return
	}
	c.mu.Lock()
	if until := c.now().Add(min(ue.RetryAfter, MaxBackoff)); until.After(c.backoffUntil) {
		c.backoffUntil = until
	}
	c.mu.Unlock()
}

// scrub removes the URL from a *url.Error: a redirected blob URL carries a
// signature in its query, which must not reach logs or error bodies.
func scrub(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		u, perr := url.Parse(ue.URL)
		if perr == nil {
			u.RawQuery, u.User = "", nil
			return &url.Error{Op: ue.Op, URL: u.String(), Err: ue.Err}
		}
		return &url.Error{Op: ue.Op, URL: "<url>", Err: ue.Err}
	}
	return err
}

// Ping does a GET /v2/ and reports whether the registry answered with
// success after authentication. An answer without the
// Docker-Distribution-API-Version header, which every registry sends there,
// is not a registry's: the error wraps ErrNotRegistry.
func (c *Client) Ping(ctx context.Context) error {
	resp, err := c.do(ctx, http.MethodGet, "/v2/", nil, nil)
	if err != nil {
		return err
	}
	drainClose(resp.Body)
	if resp.Header.Get("Docker-Distribution-API-Version") == "" {
		return fmt.Errorf("%w: GET /v2/ answered %d without Docker-Distribution-API-Version", ErrNotRegistry, resp.StatusCode)
	}
	return nil
}

func acceptHeader(accept []string) http.Header {
	if len(accept) == 0 {
		accept = ManifestMediaTypes
	}
	return http.Header{"Accept": {strings.Join(accept, ", ")}}
}

// GetManifest fetches the manifest repo:ref (ref is a tag or a digest),
// asking for the media types in accept (ManifestMediaTypes when empty). When
// ref is a digest the body is verified against it; a mismatch returns an
// error wrapping ErrInvalidContent. Bodies over MaxManifestSize are refused.
func (c *Client) GetManifest(ctx context.Context, repo, ref string, accept []string) (*Manifest, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v2/"+repo+"/manifests/"+ref, nil, acceptHeader(accept))
	if err != nil {
		return nil, err
	}
	defer drainClose(resp.Body)
	if resp.ContentLength > MaxManifestSize {
		return nil, fmt.Errorf("%w: manifest of %d bytes exceeds %d", ErrInvalidContent, resp.ContentLength, MaxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return nil, fmt.Errorf("upstream: reading manifest: %w", err)
	}
	if len(body) > MaxManifestSize {
		return nil, fmt.Errorf("%w: manifest exceeds %d bytes", ErrInvalidContent, MaxManifestSize)
	}
	if resp.ContentLength >= 0 && int64(len(body)) != resp.ContentLength {
		return nil, fmt.Errorf("%w: manifest body is %d bytes, Content-Length said %d", ErrInvalidContent, len(body), resp.ContentLength)
	}
	mt := manifestMediaType(resp.Header.Get("Content-Type"), body)
	m := &Manifest{MediaType: mt, Body: body}
	if want, err := digest.Parse(ref); err == nil {
		if want.Algorithm().FromBytes(body) != want { // Parse: the algorithm is available
			return nil, fmt.Errorf("%w: manifest does not match digest %s", ErrInvalidContent, want)
		}
		m.Digest = want
		return m, nil
	}
	m.Digest = digest.FromBytes(body)
	if hd := resp.Header.Get("Docker-Content-Digest"); hd != "" {
		if d, err := digest.Parse(hd); err == nil && d.Algorithm() == digest.Canonical && d != m.Digest {
			return nil, fmt.Errorf("%w: manifest does not match its Docker-Content-Digest", ErrInvalidContent)
		}
	}
	return m, nil
}

// manifestMediaType takes the media type from Content-Type (without
// parameters), or from the body's mediaType field when the header is absent
// or generic.
func manifestMediaType(ct string, body []byte) string {
	mt, _, err := mime.ParseMediaType(ct)
	if err == nil && mt != "" && mt != "application/json" && mt != "text/plain" && mt != "application/octet-stream" {
		return mt
	}
	var probe struct {
		MediaType string `json:"mediaType"`
	}
	if json.Unmarshal(body, &probe) == nil && probe.MediaType != "" {
		return probe.MediaType
	}
	if mt != "" {
		return mt
	}
	return "application/json"
}

// HeadManifest asks for the descriptor of repo:ref without its body.
func (c *Client) HeadManifest(ctx context.Context, repo, ref string, accept []string) (Descriptor, error) {
	resp, err := c.do(ctx, http.MethodHead, "/v2/"+repo+"/manifests/"+ref, nil, acceptHeader(accept))
	if err != nil {
		return Descriptor{}, err
	}
	drainClose(resp.Body)
	d := Descriptor{Size: resp.ContentLength}
	d.MediaType, _, _ = mime.ParseMediaType(resp.Header.Get("Content-Type"))
	d.Digest, err = digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return Descriptor{}, fmt.Errorf("%w: HEAD manifest without a valid Docker-Content-Digest", ErrInvalidContent)
	}
	return d, nil
}

// GetBlob opens repo's blob dgst from byte offset on, following the
// registry's redirect to its CDN. Blob.Size is the full size: from
// Content-Range on a 206, from Content-Length on a 200 (-1 when chunked).
// The caller verifies the content and closes Body.
func (c *Client) GetBlob(ctx context.Context, repo string, dgst digest.Digest, offset int64) (*Blob, error) {
	var hdr http.Header
	if offset > 0 {
		hdr = http.Header{"Range": {"bytes=" + strconv.FormatInt(offset, 10) + "-"}}
	}
	resp, err := c.do(ctx, http.MethodGet, "/v2/"+repo+"/blobs/"+dgst.String(), nil, hdr)
	if err != nil {
		return nil, err
	}
	b := &Blob{Body: resp.Body, Size: resp.ContentLength}
	switch {
	case offset > 0 && resp.StatusCode == http.StatusPartialContent:
		start, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != offset {
			drainClose(resp.Body)
			return nil, fmt.Errorf("%w: bad Content-Range on resumed blob", ErrInvalidContent)
		}
		b.Size = size
	case offset > 0:
		// The upstream ignored Range: skip to the offset ourselves.
		if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
			drainClose(resp.Body)
			return nil, fmt.Errorf("upstream: skipping to offset %d: %w", offset, err)
		}
	}
	return b, nil
}

// parseContentRange parses "bytes START-END/SIZE". SIZE "*" is refused.
func parseContentRange(v string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, total, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	s, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(s, 10, 64)
	size, err2 := strconv.ParseInt(total, 10, 64)
	return start, size, err1 == nil && err2 == nil
}

// HeadBlob returns the size (bytes) of repo's blob dgst.
func (c *Client) HeadBlob(ctx context.Context, repo string, dgst digest.Digest) (int64, error) {
	resp, err := c.do(ctx, http.MethodHead, "/v2/"+repo+"/blobs/"+dgst.String(), nil, nil)
	if err != nil {
		return 0, err
	}
	drainClose(resp.Body)
	if resp.ContentLength < 0 {
		return 0, fmt.Errorf("%w: HEAD blob without Content-Length", ErrInvalidContent)
	}
	return resp.ContentLength, nil
}

// TagPage is one page of a tag list.
type TagPage struct {
	Tags []string
	More bool // the upstream announced a next page (Link rel="next")
	// next is the announced next page's path and query when it is on the
	// registry's own origin and for the same repository's tag list.
	next *url.URL
}

// ListTags lists repo's tags, n at most (0: the upstream's default), after
// tag last (lexical order, OCI distribution spec "Listing Tags").
func (c *Client) ListTags(ctx context.Context, repo string, n int, last string) (*TagPage, error) {
	q := url.Values{}
	if n > 0 {
		q.Set("n", strconv.Itoa(n))
	}
	if last != "" {
		q.Set("last", last)
	}
	return c.tagPage(ctx, repo, "/v2/"+repo+"/tags/list", q)
}

func (c *Client) tagPage(ctx context.Context, repo, path string, q url.Values) (*TagPage, error) {
	resp, err := c.do(ctx, http.MethodGet, path, q, nil)
	if err != nil {
		return nil, err
	}
	defer drainClose(resp.Body)
	var body struct {
		Tags []string `json:"tags"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&body); err != nil {
		return nil, fmt.Errorf("%w: tag list is not JSON: %v", ErrInvalidContent, err)
	}
	link := resp.Header.Get("Link")
	page := &TagPage{Tags: body.Tags, More: strings.Contains(link, `rel="next"`)}
	if page.More {
		page.next = c.nextPage(resp.Request.URL, link, "/v2/"+repo+"/tags/list")
	}
	return page, nil
}

// nextPage returns the target of a Link header's rel="next" entry, resolved
// against the request URL, when it is the tag list wantPath on the
// registry's own origin (the only place credentials may go); else nil.
func (c *Client) nextPage(req *url.URL, link, wantPath string) *url.URL {
	for entry := range strings.SplitSeq(link, ",") {
		target, params, ok := strings.Cut(entry, ";")
		if !ok || !strings.Contains(params, `rel="next"`) {
			continue
		}
		target = strings.TrimSpace(target)
		if !strings.HasPrefix(target, "<") || !strings.HasSuffix(target, ">") {
			return nil
		}
		u, err := req.Parse(strings.Trim(target, "<>"))
		if err != nil || u.Scheme != c.base.Scheme || u.Host != c.base.Host ||
			u.Path != strings.TrimSuffix(c.base.Path, "/")+wantPath {
			return nil
		}
		u.Path = wantPath
		return u
	}
	return nil
}

// MaxTagPages bounds how many upstream pages ListAllTags follows: 100
// pages, 10,000 tags at nvcr.io's 100 a page.
const MaxTagPages = 100

// ListAllTags lists all of repo's tags after last ("" for all) in lexical
// order, following the upstream's Link rel="next" pages (OCI distribution
// spec, "Listing Tags"), at most maxPages of them (MaxTagPages when <= 0).
// It asks for 1000 tags a page (nvcr.io sends 100 whatever n says).
// complete is false when the bound stopped it with pages left. A Link that
// leaves the registry's origin or its tag list is not followed; the next
// page is then asked with last= the last tag received. Errors are
// ListTags'.
func (c *Client) ListAllTags(ctx context.Context, repo, last string, maxPages int) (tags []string, complete bool, err error) {
	if maxPages <= 0 {
		maxPages = MaxTagPages
	}
	path, q := "/v2/"+repo+"/tags/list", url.Values{"n": {"1000"}}
	if last != "" {
		q.Set("last", last)
	}
	for range maxPages {
		page, err := c.tagPage(ctx, repo, path, q)
		if err != nil {
			return nil, false, err
		}
		tags = append(tags, page.Tags...)
		if !page.More || len(page.Tags) == 0 {
			sort.Strings(tags)
			return slices.Compact(tags), true, nil
		}
		if page.next != nil {
			path, q = page.next.Path, page.next.Query()
		} else {
			q = url.Values{"n": {"1000"}, "last": {page.Tags[len(page.Tags)-1]}}
		}
	}
	sort.Strings(tags)
	return slices.Compact(tags), false, nil
}

func drainClose(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, 64<<10))
	_ = rc.Close()
}

// CanPull reports whether the client's credentials may pull repo: it lists
// one tag. allowed is false when the upstream refused (401, 403, 404, or
// the token realm refused the credentials); err is set when the upstream
// could not answer.
func (c *Client) CanPull(ctx context.Context, repo string) (allowed bool, err error) {
	_, err = c.ListTags(ctx, repo, 1, "")
	var te *auth.TokenError
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrUnauthorized), errors.Is(err, ErrDenied), errors.Is(err, ErrNotFound),
		errors.As(err, &te) && (te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden):
		return false, nil
	}
	return false, err
}
