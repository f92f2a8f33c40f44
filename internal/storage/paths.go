package storage

import (
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/ngc-mirror/ngc-mirror/internal/names"
)

// LayoutVersion is the version of the cache layout (the package doc) that
// this code reads and writes, recorded in the cache at LayoutPath.
//
//	1  (no version file) tag records, tag lists and links under
//	   /repositories/<name>, keyed by repository alone
//	2  tag records, tag lists and links under /registries/<registry>/<name>,
//	   keyed by the upstream registry as well
//
// Blobs, manifests, uploads, quarantine and the health probe have the same
// paths in both.
const LayoutVersion = 2

// PathSpec names one place in the cache layout; Path turns it into the
// driver path. The specs are the only way this package (and tests) build
// paths, so the layout is written down once, here.
type PathSpec interface{ pathSpec() }

// BlobPath is the bytes of blob Digest.
type BlobPath struct{ Digest digest.Digest }

// ManifestPath is manifest Digest: "<media type>\n" + its exact bytes.
type ManifestPath struct{ Digest digest.Digest }

// ContentRoot is the directory holding every object of Kind.
type ContentRoot struct{ Kind Kind }

// TagPath is the JSON TagRecord of Repo:Tag.
type TagPath struct {
	Repo Repo
	Tag  string
}

// TagsPath is the directory of Repo's tag records.
type TagsPath struct{ Repo Repo }

// TagListPath is Repo's merged tag list (JSON TagList).
type TagListPath struct{ Repo Repo }

// LinkPath records that Repo holds Digest (an empty file).
type LinkPath struct {
	Repo   Repo
	Digest digest.Digest
}

// UploadsPath is the directory of blobs being written; UploadPath one of
// them.
type UploadsPath struct{}

// UploadPath is one blob being written, by a random ID.
type UploadPath struct{ ID string }

// UploadMarkerPath is the heartbeat marker of upload ID, "<upload>.live"
// next to it: rewritten while the fill writing the upload runs, so that
// GC never removes a running fill's upload (UploadHeartbeat).
type UploadMarkerPath struct{ ID string }

// liveSuffix ends an UploadMarkerPath.
const liveSuffix = ".live"

// QuarantinePath is where fsck --repair quarantine moves damaged content
// of Kind, stamped with the time At (the digest from the file name may be
// invalid: that is damage too).
type QuarantinePath struct {
	Kind   Kind
	Digest digest.Digest
	At     time.Time
}

// QuarantineRoot is the directory of everything quarantined.
type QuarantineRoot struct{}

// HealthPath is the object the readiness probe writes and removes.
type HealthPath struct{}

// LayoutPath is the file recording LayoutVersion.
type LayoutPath struct{}

// RegistriesPath is the root of every registry's tag records and links
// (layout 2).
type RegistriesPath struct{}

// v1RepositoriesPath is the root of tag records and links in layout 1.
type v1RepositoriesPath struct{}

func (BlobPath) pathSpec()           {}
func (ManifestPath) pathSpec()       {}
func (ContentRoot) pathSpec()        {}
func (TagPath) pathSpec()            {}
func (TagsPath) pathSpec()           {}
func (LinkPath) pathSpec()           {}
func (TagListPath) pathSpec()        {}
func (UploadsPath) pathSpec()        {}
func (UploadPath) pathSpec()         {}
func (UploadMarkerPath) pathSpec()   {}
func (QuarantinePath) pathSpec()     {}
func (HealthPath) pathSpec()         {}
func (QuarantineRoot) pathSpec()     {}
func (LayoutPath) pathSpec()         {}
func (RegistriesPath) pathSpec()     {}
func (v1RepositoriesPath) pathSpec() {}

// Repo is a repository of one upstream registry: the key of tag records
// and links. Registry is the upstream's registry name (upstream.Registry):
// the default upstream's host as its URL names it ("nvcr.io",
// "127.0.0.1:5000"), or a further upstream's key in the configuration
// ("docker.io"); Name the repository path on it ("nvidia/pytorch",
// "library/ubuntu").
type Repo struct {
	Registry string
	Name     string
}

func (r Repo) String() string { return r.Registry + "/" + r.Name }

// validRegistry accepts a lower-case host[:port].
func validRegistry(s string) bool {
	return s != "" && s != "." && s != ".." && s == strings.ToLower(s) && !strings.ContainsAny(s, "/\\ \t\n")
}

// registryElement is registry as one path element: storage drivers take
// only [A-Za-z0-9._-] in paths, so every other byte (the ':' before a
// port, IPv6 brackets) is written as '_', which host names never contain
// ("127.0.0.1:5000" → "127.0.0.1_5000").
func registryElement(registry string) string {
	b := []byte(registry)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-') {
			b[i] = '_'
		}
	}
	return string(b)
}

func (r Repo) dir() (string, error) {
	if !validRegistry(r.Registry) {
		return "", fmt.Errorf("storage: invalid registry %q", r.Registry)
	}
	if !names.ValidRepository(r.Name) {
		return "", fmt.Errorf("storage: invalid repository name %q", r.Name)
	}
	return path.Join("/registries", registryElement(r.Registry), r.Name), nil
}

func contentDir(k Kind) (string, error) {
	switch k {
	case KindBlob:
		return "/blobs", nil
	case KindManifest:
		return "/manifests", nil
	}
	return "", fmt.Errorf("storage: unknown kind %q", k)
}

func digestPath(root string, d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnsupportedDigest, err)
	}
	h := d.Encoded()
	return path.Join(root, string(d.Algorithm()), h[:2], h), nil
}

// Path returns the driver path of spec. Errors: an invalid digest
// (wrapping ErrUnsupportedDigest), registry, repository name or tag.
func Path(spec PathSpec) (string, error) {
	switch s := spec.(type) {
	case BlobPath:
		return digestPath("/blobs", s.Digest)
	case ManifestPath:
		return digestPath("/manifests", s.Digest)
	case ContentRoot:
		return contentDir(s.Kind)
	case TagPath:
		if !names.ValidTag(s.Tag) {
			return "", fmt.Errorf("storage: invalid tag %q", s.Tag)
		}
		dir, err := s.Repo.dir()
		if err != nil {
			return "", err
		}
		return path.Join(dir, "_tags", s.Tag), nil
	case TagsPath:
		dir, err := s.Repo.dir()
		if err != nil {
			return "", err
		}
		return path.Join(dir, "_tags"), nil
	case TagListPath:
		dir, err := s.Repo.dir()
		if err != nil {
			return "", err
		}
		return path.Join(dir, "_taglist"), nil
	case LinkPath:
		dir, err := s.Repo.dir()
		if err != nil {
			return "", err
		}
		if err := s.Digest.Validate(); err != nil {
			return "", fmt.Errorf("%w: %v", ErrUnsupportedDigest, err)
		}
		return path.Join(dir, "_links", string(s.Digest.Algorithm()), s.Digest.Encoded()), nil
	case UploadsPath:
		return "/_uploads", nil
	case UploadPath:
		if s.ID == "" || strings.ContainsAny(s.ID, "/.") {
			return "", fmt.Errorf("storage: invalid upload ID %q", s.ID)
		}
		return "/_uploads/" + s.ID, nil
	case UploadMarkerPath:
		p, err := Path(UploadPath(s))
		if err != nil {
			return "", err
		}
		return p + liveSuffix, nil
	case QuarantinePath:
		if _, err := contentDir(s.Kind); err != nil {
			return "", err
		}
		return path.Join("/_quarantine", string(s.Kind), string(s.Digest.Algorithm()),
			s.Digest.Encoded()+"."+s.At.UTC().Format("20060102T150405Z")), nil
	case QuarantineRoot:
		return "/_quarantine", nil
	case HealthPath:
		return "/_health/probe", nil
	case LayoutPath:
		return "/_layout", nil
	case RegistriesPath:
		return "/registries", nil
	case v1RepositoriesPath:
		return "/repositories", nil
	}
	return "", fmt.Errorf("storage: unknown path spec %T", spec)
}

// mustPath is Path for specs whose fields were validated already.
func mustPath(spec PathSpec) string {
	p, err := Path(spec)
	if err != nil {
		panic(err)
	}
	return p
}
