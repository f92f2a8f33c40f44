// Package names checks the names that requests, rules and the config
// carry: repository names and tags (the distribution/reference grammar)
// and platforms ("os/arch[/variant]").
package names

import (
	"regexp"

	"github.com/distribution/reference"
)

var (
	tag      = regexp.MustCompile(`^` + reference.TagRegexp.String() + `$`)
	platform = regexp.MustCompile(`^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$`)
)

// ValidTag reports whether s is a whole tag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
func ValidTag(s string) bool { return tag.MatchString(s) }

// ValidRepository reports whether s is a repository path on the registry
// (nvidia/pytorch, nvidia/k8s/dcgm-exporter): lower-case components
// separated by '/', at most 255 characters, no host.
func ValidRepository(s string) bool {
	if len(s) > reference.NameTotalLengthMax {
		return false
	}
	named, err := reference.ParseNamed("nvcr.io/" + s)
	return err == nil && reference.Path(named) == s
}

// ValidPlatform reports whether s has the form os/arch[/variant]
// (linux/amd64, linux/arm64/v8).
func ValidPlatform(s string) bool { return platform.MatchString(s) }
