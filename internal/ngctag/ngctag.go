// Package ngctag reads NGC's tag conventions: the monthly framework tags
// ("24.05-py3": release 24.05, variant py3) and everything else (cuda's
// "12.4.1-base-ubuntu22.04", "sha256-<hex>.sig" signatures, "latest"), which
// stay plain tags.
package ngctag

import (
	"regexp"
	"sort"
)

// Tag is a parsed tag.
type Tag struct {
	Name string
	// Monthly reports whether Name has NGC's monthly form YY.MM[-variant].
	Monthly bool
	// Release is "YY.MM" for a monthly tag ("24.05"), "" otherwise. Two
	// releases compare correctly as strings.
	Release string
	// Variant is what follows the release: "py3", "tf2-py3", "py3-igpu",
	// "py3-sdk"; "" for a bare release ("17.12") or a plain tag.
	Variant string
}

// monthly is YY.MM (years 17-99: NGC's monthly images began with 17.xx;
// months 01-12), then the end or "-variant". Three-part versions such as
// cuda's 12.4.1 never match: the month must be two digits and followed by
// '-' or the end.
var monthly = regexp.MustCompile(`^(1[7-9]|[2-9][0-9])\.(0[1-9]|1[0-2])(?:-([A-Za-z0-9][A-Za-z0-9_.-]*))?$`)

// Parse reads a tag. It never fails: a tag that is not monthly is a plain
// tag.
func Parse(name string) Tag {
	m := monthly.FindStringSubmatch(name)
	if m == nil {
		return Tag{Name: name}
	}
	return Tag{Name: name, Monthly: true, Release: m[1] + "." + m[2], Variant: m[3]}
}

// Newer reports whether release a is later than release b ("24.05" >
// "24.04"; anything > "").
func Newer(a, b string) bool { return a > b }

// LatestReleases returns the n newest distinct releases among tags, newest
// first.
func LatestReleases(tags []Tag, n int) []string {
	seen := map[string]bool{}
	var rel []string
	for _, t := range tags {
		if t.Monthly && !seen[t.Release] {
			seen[t.Release] = true
			rel = append(rel, t.Release)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(rel)))
	if n >= 0 && len(rel) > n {
		rel = rel[:n]
	}
	return rel
}
