// Package prefetch pre-warms the cache: rules from the config select
// repositories, tags, variants and platforms on a cron schedule; the
// automatic rule follows the pull history to new monthly releases; jobs
// fetch an image's manifests and blobs through the same fill path as
// client pulls (so both coalesce), record progress in the state store and
// resume after a restart. One replica, the holder of the scheduler lock,
// runs ticks and jobs.
package prefetch

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/ngc-mirror/ngc-mirror/internal/access"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/names"
	"github.com/ngc-mirror/ngc-mirror/internal/ngctag"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// RuleSpec is a prefetch rule as written in the config (prefetch.rules)
// or sent to the admin API:
//   - Repositories: names or globs ("nvidia/*" matches one path component,
//     "nvidia/**" any number); a glob selects among tracked repositories.
//   - Tags: a tag is selected when any of Regex (whole name), Latest (the
//     monthly tags of the N newest releases) or Exact selects it.
//   - Variants keeps only monthly tags of these variants ("py3",
//     "py3-igpu"; "" is a bare release like "17.12"); exact tags always
//     stay. Empty: all.
//   - Platforms ("linux/amd64") whose manifests and layers are fetched; the
//     index itself is always kept. Empty: all.
//   - Schedule: a cron expression ("0 3 * * *", "@daily", "@every 6h");
//     empty runs the rule only when asked (admin API).
//   - Concurrency: blobs fetched at once by one job (default 4).
//   - Bandwidth: bytes per second of upstream reads, shared by the rule's
//     jobs (0: none); lifted for a blob while a client waits on it.
//   - Pin keeps the selected images out of cache eviction.
type RuleSpec = config.PrefetchRule

// Rule is a validated RuleSpec.
type Rule struct {
	RuleSpec
	regex    *regexp.Regexp
	schedule cron.Schedule // nil: no schedule
}

// ErrInvalidRule wraps every rule validation error.
var ErrInvalidRule = errors.New("invalid prefetch rule")

// Compile validates spec. Errors wrap ErrInvalidRule and say which field is
// wrong.
func Compile(spec RuleSpec) (*Rule, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w %q: %s", ErrInvalidRule, spec.Name, fmt.Sprintf(format, a...))
	}
	r := &Rule{RuleSpec: spec}
	if spec.Name == "" || spec.Name == AutoRule || strings.ContainsAny(spec.Name, " \t\n:") {
		return nil, bad("name must be set, without spaces or ':', and not %q", AutoRule)
	}
	if len(spec.Repositories) == 0 {
		return nil, bad("repositories is empty")
	}
	for _, p := range spec.Repositories {
		if err := validPattern(p); err != nil {
			return nil, bad("repository %q: %v", p, err)
		}
	}
	if spec.Tags.Regex == "" && spec.Tags.Latest == 0 && len(spec.Tags.Exact) == 0 {
		return nil, bad("tags needs regex, latest or exact")
	}
	if spec.Tags.Latest < 0 {
		return nil, bad("tags.latest must not be negative")
	}
	if spec.Tags.Regex != "" {
		re, err := regexp.Compile(`^(?:` + spec.Tags.Regex + `)$`)
		if err != nil {
			return nil, bad("tags.regex: %v", err)
		}
		r.regex = re
	}
	for _, t := range spec.Tags.Exact {
		if !names.ValidTag(t) {
			return nil, bad("tags.exact: %q is not a tag", t)
		}
	}
	for _, p := range spec.Platforms {
		if !names.ValidPlatform(p) {
			return nil, bad("platform %q: want os/arch[/variant], like linux/amd64", p)
		}
	}
	if spec.Concurrency < 0 || spec.Concurrency > 64 {
		return nil, bad("concurrency must be 0 (default 4) to 64")
	}
	if spec.Bandwidth < 0 {
		return nil, bad("bandwidth must not be negative")
	}
	if spec.Schedule != "" {
		s, err := ParseSchedule(spec.Schedule)
		if err != nil {
			return nil, bad("schedule: %v", err)
		}
		r.schedule = s
	}
	return r, nil
}

// validPattern accepts a repository name whose components may be "*" globs
// (path.Match syntax within a component) or "**".
func validPattern(p string) error {
	if p == "" {
		return errors.New("empty")
	}
	if !IsGlob(p) {
		if !names.ValidRepository(p) {
			return errors.New("not a repository name")
		}
		return nil
	}
	for _, c := range strings.Split(p, "/") {
		if c == "**" {
			continue
		}
		if _, err := path.Match(c, "x"); err != nil {
			return err
		}
	}
	return nil
}

// IsGlob reports whether a repository pattern has glob characters.
func IsGlob(p string) bool { return strings.ContainsAny(p, "*?[") }

// Literal returns the rule's repositories that are plain names (always
// tracked).
func (r *Rule) Literal() []string {
	var out []string
	for _, p := range r.Repositories {
		if !IsGlob(p) {
			out = append(out, p)
		}
	}
	return out
}

// Matches reports whether the rule covers repository name.
func (r *Rule) Matches(name string) bool {
	for _, p := range r.Repositories {
		if access.MatchRepository(p, name) {
			return true
		}
	}
	return false
}

// SelectTags returns the names of tags the rule selects, sorted.
func (r *Rule) SelectTags(tags []state.Tag) []string {
	parsed := make([]ngctag.Tag, 0, len(tags))
	for _, t := range tags {
		p := ngctag.Parse(t.Name)
		if len(r.Variants) > 0 && (!p.Monthly || !slices.Contains(r.Variants, p.Variant)) {
			if !slices.Contains(r.Tags.Exact, t.Name) {
				continue
			}
		}
		parsed = append(parsed, p)
	}
	latest := map[string]bool{}
	if r.Tags.Latest > 0 {
		for _, rel := range ngctag.LatestReleases(parsed, r.Tags.Latest) {
			latest[rel] = true
		}
	}
	var out []string
	for _, p := range parsed {
		if slices.Contains(r.Tags.Exact, p.Name) ||
			(r.regex != nil && r.regex.MatchString(p.Name)) ||
			(p.Monthly && latest[p.Release]) {
			out = append(out, p.Name)
		}
	}
	slices.Sort(out)
	return out
}

// AutoRule is the Job.Rule of jobs made by the automatic rule.
const AutoRule = "auto"

// next returns the schedule's next tick after now. Constant-delay
// schedules ("@every 1h") are aligned to the Unix epoch, so that every
// replica computes the same tick times (and so the same claim keys).
func next(s cron.Schedule, now time.Time) time.Time {
	if d, ok := s.(cron.ConstantDelaySchedule); ok {
		step := d.Delay
		if step < time.Second {
			step = time.Second
		}
		return now.Truncate(step).Add(step)
	}
	return s.Next(now)
}

// Next returns the rule's next scheduled tick after now (zero without a
// schedule).
func (r *Rule) Next(now time.Time) time.Time {
	if r.schedule == nil {
		return time.Time{}
	}
	return next(r.schedule, now)
}

// ParseSchedule parses a cron expression (5 fields or a descriptor such as
// @daily or @every 6h). @every needs at least a second.
func ParseSchedule(spec string) (cron.Schedule, error) {
	if v, ok := strings.CutPrefix(spec, "@every "); ok {
		// The parser would silently round a shorter delay up to 1 s.
		if d, err := time.ParseDuration(strings.TrimSpace(v)); err == nil && d < time.Second {
			return nil, fmt.Errorf("%q: @every needs at least 1s", spec)
		}
	}
	return cron.ParseStandard(spec)
}
