package config

import (
	"errors"
	"fmt"
	"math"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// explain turns a YAML decoding error of raw into one that names the key
// path (cache.max_size) of each problem and says what was expected, in
// place of yaml.v3's Go types ("field max_szie not found in type
// config.Cache", "cannot unmarshal !!str into int"). It returns err
// unchanged when raw does not parse as YAML at all (a syntax error, which
// yaml.v3 already gives with its line).
func explain(raw []byte, err error) error {
	w := walkConfig(raw)
	if w == nil {
		return err
	}
	if len(w.unknown) > 0 {
		return errors.New(strings.Join(w.unknown, "; ") + " (configs/mirror.yaml lists every key)")
	}
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	for i, m := range msgs {
		msgs[i] = w.annotate(m)
	}
	return errors.New(strings.Join(msgs, "; "))
}

// wholeNumbers refuses a number with a fraction (0.5, 1.5) where the
// Config type has an integer: yaml.v3 would truncate it silently
// (limits.requests_per_second: 0.5 became 0, rate limiting off). raw must
// already decode; the error names the line and key path of each, like
// explain's. Whole numbers written as floats (2.0, 1e3) pass.
func wholeNumbers(raw []byte) error {
	if w := walkConfig(raw); w != nil && len(w.notWhole) > 0 {
		return errors.New(strings.Join(w.notWhole, "; "))
	}
	return nil
}

// walkConfig walks the YAML document raw along the Config type; nil when
// raw is not YAML.
func walkConfig(raw []byte) *keyWalk {
	var root yaml.Node
	if yaml.Unmarshal(raw, &root) != nil {
		return nil
	}
	w := &keyWalk{at: map[int]string{}}
	w.walk(&root, reflect.TypeOf(Config{}), "")
	return w
}

// keyWalk follows a YAML document along the Config type.
type keyWalk struct {
	at       map[int]string // line → key path of the value there
	unknown  []string       // "line N: unknown key a.b"
	notWhole []string       // "line N: a.b: want a whole number, got 1.5"
}

var unmarshalerType = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()

func (w *keyWalk) walk(n *yaml.Node, t reflect.Type, prefix string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		return // decodes itself (sizes, durations)
	}
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			w.walk(c, t, prefix)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if prefix != "" {
				p = prefix + "." + k.Value
			}
			w.at[k.Line], w.at[v.Line] = p, p
			switch t.Kind() {
			case reflect.Struct:
				ft, ok := yamlField(t, k.Value)
				if !ok {
					w.unknown = append(w.unknown, fmt.Sprintf("line %d: unknown key %s", k.Line, p))
					continue
				}
				w.walk(v, ft, p)
			case reflect.Map:
				w.walk(v, t.Elem(), p)
			}
		}
	case yaml.ScalarNode:
		if isInt(t.Kind()) && n.ShortTag() == "!!float" {
			var f float64
			if n.Decode(&f) == nil && (math.IsInf(f, 0) || math.IsNaN(f) || f != math.Trunc(f)) {
				w.notWhole = append(w.notWhole, fmt.Sprintf("line %d: %s: want a whole number, got %s", n.Line, prefix, n.Value))
			}
		}
	case yaml.SequenceNode:
		if t.Kind() == reflect.Slice || t.Kind() == reflect.Array {
			for i, c := range n.Content {
				w.walk(c, t.Elem(), prefix+"["+strconv.Itoa(i)+"]")
			}
		}
	}
}

// isInt reports whether k is one of Go's integer kinds.
func isInt(k reflect.Kind) bool {
	return k >= reflect.Int && k <= reflect.Uint64
}

// yamlField returns the type of t's field named name in YAML.
func yamlField(t reflect.Type, name string) (reflect.Type, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if tag == "-" || !f.IsExported() {
			continue
		}
		if tag == "" {
			tag = strings.ToLower(f.Name)
		}
		if tag == name {
			return f.Type, true
		}
	}
	return nil, false
}

var (
	lineRe      = regexp.MustCompile(`^line (\d+): `)
	cannotRe    = regexp.MustCompile("cannot unmarshal !!(\\w+) `?([^`]*)`? into (\\S+)")
	goTypeWords = map[string]string{
		"int": "a whole number", "int64": "a whole number", "int32": "a whole number",
		"float64": "a number", "bool": "true or false", "string": "a string",
	}
)

// annotate puts the key path after a message's "line N: " and replaces Go
// type names by what to write.
func (w *keyWalk) annotate(m string) string {
	loc := lineRe.FindStringSubmatch(m)
	if loc == nil {
		return m
	}
	line, _ := strconv.Atoi(loc[1])
	rest := m[len(loc[0]):]
	if c := cannotRe.FindStringSubmatch(rest); c != nil {
		want := goTypeWords[c[3]]
		switch {
		case want != "":
		case strings.HasPrefix(c[3], "[]"):
			want = "a list"
		case strings.HasPrefix(c[3], "map["), strings.HasPrefix(c[3], "config."):
			want = "a mapping of keys"
		default:
			want = c[3]
		}
		got := "a " + c[1]
		if c[1] == "str" {
			got = strconv.Quote(c[2])
		}
		rest = "want " + want + ", got " + got
	}
	if p := w.at[line]; p != "" {
		return loc[0] + p + ": " + rest
	}
	return m
}
