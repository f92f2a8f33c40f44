package ngctest

import "net/http"

// PlainOptions tune the plain registry fake.
type PlainOptions struct {
	// Redirect sends blob GETs to the CDN listener (as registry.k8s.io
	// redirects to its storage hosts); otherwise the registry serves blob
	// bytes itself, as a minimal registry:2 does.
	Redirect bool
}

// Plain is a running plain registry fake: no authentication at all (no
// challenge, no token realm), repositories with single-component names at
// the root (pause, never library/pause), 404 NAME_UNKNOWN for unknown
// repositories. Request counters, SetFault and the rest are the NGC fake's.
// Close it when done.
type Plain struct {
	*Upstream
}

// openGate admits every request: the plain registry has no authentication.
type openGate struct{}

func (openGate) serveOwn(http.ResponseWriter, *http.Request) bool      { return false }
func (openGate) admit(http.ResponseWriter, *http.Request, string) bool { return true }

// NewPlain starts a plain registry fake with no content. Add content with
// Populate or AddImage (private repositories are not private here: there is
// no authentication to hold them back).
func NewPlain(opts PlainOptions) *Plain {
	u := newBare(0)
	u.gate = openGate{}
	u.direct = !opts.Redirect
	u.start()
	return &Plain{Upstream: u}
}

// Repositories and tags of the plain registry fixture (registry.k8s.io
// style names).
const (
	PlainPauseRepo   = "pause"
	PlainPauseTag    = "3.10"
	PlainCoreDNSRepo = "coredns/coredns"
	PlainCoreDNSTag  = "v1.11.3"
)

// PlainFixture is the standard content of the plain registry fake.
type PlainFixture struct {
	// Pause is pause:3.10, a single-component name (which no client or
	// mirror may turn into library/pause here), an OCI image index for
	// linux/amd64 and linux/arm64.
	Pause *Image
	// CoreDNS is coredns/coredns:v1.11.3, a single Docker schema2 image.
	CoreDNS *Image
}

// Populate builds the standard plain registry fixture (layers of about
// layerSize bytes each, uncompressed) and publishes it.
func (p *Plain) Populate(layerSize int64) (*PlainFixture, error) {
	var f PlainFixture
	amd, err := p.buildRandom("linux/amd64", true, layerSize, 1)
	if err != nil {
		return nil, err
	}
	arm, err := p.buildRandom("linux/arm64", true, layerSize, 1)
	if err != nil {
		return nil, err
	}
	if f.Pause, err = BuildIndex(true, amd, arm); err != nil {
		return nil, err
	}
	if f.CoreDNS, err = p.buildRandom("linux/amd64", false, layerSize, 2); err != nil {
		return nil, err
	}
	p.AddImage(PlainPauseRepo, false, f.Pause, PlainPauseTag)
	p.AddImage(PlainCoreDNSRepo, false, f.CoreDNS, PlainCoreDNSTag)
	return &f, nil
}
