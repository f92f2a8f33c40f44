package config

import "log/slog"

// Warning is a setting that is valid but cannot do what it says: serve
// logs each at start-up (at warn level, Message with Attrs) and runs on.
type Warning struct {
	// Message says what is wrong and why, naming the keys as the
	// configuration file spells them (their values are in Attrs).
	Message string
	// Attrs are those keys with their values.
	Attrs []slog.Attr
}

// Warnings returns the warnings of c (Load validated it), in the order of
// the keys: the default upstream's first, then the further upstreams by
// name.
//
// An upstream's max_fills (upstream.max_fills, upstreams.<name>.max_fills)
// larger than a non-zero limits.max_fills can never bind: limits.max_fills
// downloads, all upstreams together, stop that upstream first.
func (c Config) Warnings() []Warning {
	var out []Warning
	fills := func(key string, n int) {
		if c.Limits.MaxFills > 0 && n > c.Limits.MaxFills {
			out = append(out, Warning{
				Message: key + " is larger than limits.max_fills and can never bind: at most limits.max_fills downloads run, all upstreams together",
				Attrs:   []slog.Attr{slog.Int(key, n), slog.Int("limits.max_fills", c.Limits.MaxFills)},
			})
		}
	}
	fills("upstream.max_fills", c.Upstream.MaxFills)
	for _, name := range c.UpstreamNames() {
		fills("upstreams."+name+".max_fills", c.Upstreams[name].MaxFills)
	}
	return out
}
