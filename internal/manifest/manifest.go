// Package manifest reads what a manifest refers to. Manifests are kept and
// served as the upstream's exact bytes; they are parsed only to find
// references (for access links now, for prefetch and garbage collection).
package manifest

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Descriptor is the part of an OCI / Docker descriptor this package reads.
type Descriptor struct {
	MediaType string        `json:"mediaType"`
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	Platform  *Platform     `json:"platform,omitempty"`
}

// Platform is an index entry's platform, or the platform fields of an
// image config (OCI image spec: os, architecture, variant).
type Platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
	Variant      string `json:"variant,omitempty"`
}

// String returns "os/arch[/variant]", or "" for no platform and for
// "unknown/unknown", which BuildKit gives its attestation manifests (they
// are not images to pull).
func (p Platform) String() string {
	if p.OS == "" || (p.OS == "unknown" && p.Architecture == "unknown") {
		return ""
	}
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// shape covers image manifests (config, layers), image indexes and Docker
// manifest lists (manifests), and OCI subject/blobs fields.
type shape struct {
	Config    *Descriptor  `json:"config"`
	Layers    []Descriptor `json:"layers"`
	Manifests []Descriptor `json:"manifests"`
	Blobs     []Descriptor `json:"blobs"`
	Subject   *Descriptor  `json:"subject"`
}

// References returns every descriptor body refers to: config, layers, the
// child manifests of an index, and an OCI subject. A body that is not a
// JSON object is an error; unknown fields are ignored, and descriptors
// without a valid digest are skipped.
func References(body []byte) ([]Descriptor, error) {
	var s shape
	if err := json.Unmarshal(body, &s); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	var out []Descriptor
	add := func(d Descriptor) {
		if d.Digest.Validate() == nil {
			out = append(out, d)
		}
	}
	if s.Config != nil {
		add(*s.Config)
	}
	for _, l := range s.Layers {
		add(l)
	}
	for _, l := range s.Blobs {
		add(l)
	}
	for _, m := range s.Manifests {
		add(m)
	}
	if s.Subject != nil {
		add(*s.Subject)
	}
	return out, nil
}

// PlatformString returns the platform of an index entry (see
// Platform.String): "" when it has none or is an attestation.
func (d Descriptor) PlatformString() string {
	if d.Platform == nil {
		return ""
	}
	return d.Platform.String()
}

// IsIndex reports whether mediaType is an OCI image index or a Docker
// manifest list.
func IsIndex(mediaType string) bool {
	return mediaType == "application/vnd.oci.image.index.v1+json" ||
		mediaType == "application/vnd.docker.distribution.manifest.list.v2+json"
}

// Children returns the child manifests of an index body, with their
// platforms (PlatformString is "" for entries without one and for
// attestations).
func Children(body []byte) ([]Descriptor, error) {
	var s shape
	if err := json.Unmarshal(body, &s); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	out := make([]Descriptor, 0, len(s.Manifests))
	for _, m := range s.Manifests {
		if m.Digest.Validate() == nil {
			out = append(out, m)
		}
	}
	return out, nil
}

// MatchPlatform reports whether platform ("linux/arm64/v8") is selected by
// want ("linux/arm64" selects every arm64 variant; "linux/arm64/v8" only
// v8). arm64 without a variant is v8 (as containerd's platform matching
// has it), so "linux/arm64/v8" also selects "linux/arm64".
func MatchPlatform(platform, want string) bool {
	if platform == want || (want == "linux/arm64/v8" && platform == "linux/arm64") {
		return true
	}
	return len(platform) > len(want) && platform[:len(want)] == want && platform[len(want)] == '/'
}
