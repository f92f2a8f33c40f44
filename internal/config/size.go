package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Size is a number of bytes, written in YAML and the environment as a plain
// number (1073741824) or with a unit: "500GiB", "1.5TB", "800M". Units are
// B, K/KB, M/MB, G/GB, T/TB, P/PB (powers of 1000) and KiB, MiB, GiB, TiB,
// PiB (powers of 1024), in any case.
type Size int64

// UnmarshalYAML parses a size.
func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*s = Size(v)
	return nil
}

// UnmarshalJSON accepts a size as a JSON number of bytes (10485760) or a
// string like the YAML's ("10MiB"), so that the admin API takes rules
// written as in the configuration.
func (s *Size) UnmarshalJSON(b []byte) error {
	var v string
	if string(b) == "null" {
		return nil // like any JSON null: no change
	}
	if len(b) > 0 && b[0] == '"' {
		if err := json.Unmarshal(b, &v); err != nil {
			return err
		}
	} else {
		v = string(b)
	}
	n, err := ParseSize(v)
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// String writes the size in the largest unit that divides it exactly:
// "50GiB", "2TB", "1500B"; "0" for none. ParseSize reads it back.
func (s Size) String() string {
	n := int64(s)
	if n == 0 {
		return "0"
	}
	for _, u := range []struct {
		name string
		mult int64
	}{{"PiB", 1 << 50}, {"PB", 1e15}, {"TiB", 1 << 40}, {"TB", 1e12}, {"GiB", 1 << 30}, {"GB", 1e9},
		{"MiB", 1 << 20}, {"MB", 1e6}, {"KiB", 1 << 10}, {"KB", 1e3}} {
		if n%u.mult == 0 {
			return strconv.FormatInt(n/u.mult, 10) + u.name
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12, "p": 1e15, "pb": 1e15,
	"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50,
}

// ParseSize parses a size (see Size) into bytes. It returns an error for
// negative, fractional-byte-free garbage or out-of-range values.
func ParseSize(v string) (int64, error) {
	t := strings.TrimSpace(v)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	}
	mult, ok := sizeUnits[unit]
	f, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || num == "" {
		return 0, fmt.Errorf("%q is not a size (like 500GiB, 2TB or a number of bytes)", v)
	}
	b := f * mult
	if b > math.MaxInt64/2 {
		return 0, fmt.Errorf("size %q is too large", v)
	}
	return int64(b), nil
}

// FreeSpace is a minimum of free space on a filesystem: a number of bytes
// (a Size) or a percentage of the filesystem ("10%").
type FreeSpace struct {
	Bytes   int64
	Percent float64 // 0 to 100
}

// String writes the minimum as it is configured: "10%", a size ("50GiB",
// see Size.String) or "0" for none.
func (f FreeSpace) String() string {
	if f.Percent != 0 {
		return strconv.FormatFloat(f.Percent, 'f', -1, 64) + "%"
	}
	return Size(f.Bytes).String()
}

// IsZero reports whether no minimum is set.
func (f FreeSpace) IsZero() bool { return f.Bytes == 0 && f.Percent == 0 }

// UnmarshalYAML parses a size or a percentage.
func (f *FreeSpace) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseFreeSpace(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*f = v
	return nil
}

// ParseFreeSpace parses "10%" or a size (see Size).
func ParseFreeSpace(v string) (FreeSpace, error) {
	if p, ok := strings.CutSuffix(strings.TrimSpace(v), "%"); ok {
		f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || f < 0 || f >= 100 {
			return FreeSpace{}, errors.New(strconv.Quote(v) + " is not a percentage from 0 to 99")
		}
		return FreeSpace{Percent: f}, nil
	}
	b, err := ParseSize(v)
	if err != nil {
		return FreeSpace{}, err
	}
	return FreeSpace{Bytes: b}, nil
}
