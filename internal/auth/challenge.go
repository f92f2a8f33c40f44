// Package auth authenticates the mirror to its upstream registry: it parses
// WWW-Authenticate challenges, exchanges NGC credentials ("$oauthtoken" and an
// API key, or none) for bearer tokens per repository scope, caches them, and
// attaches them only to requests for the registry's own origin.
package auth

import (
	"fmt"
	"strings"
)

// Challenge is one parsed WWW-Authenticate challenge (RFC 7235 section 4.1).
// Scheme is lower-cased ("bearer", "basic"); parameter names are lower-cased,
// values are unquoted.
type Challenge struct {
	Scheme string
	Params map[string]string
}

// Realm returns the challenge's realm parameter, or "".
func (c Challenge) Realm() string { return c.Params["realm"] }

// ParseChallenges parses a WWW-Authenticate header value into its challenges.
// It accepts quoted and token parameter values, quoted-pair escapes and
// several challenges in one header. An empty or malformed header yields an
// error; a challenge with no parameters is allowed.
//
// nvcr.io sends `Bearer realm="https://nvcr.io/proxy_auth",scope=""` (no
// service parameter), so an empty scope and a missing service are normal.
func ParseChallenges(header string) ([]Challenge, error) {
	p := &parser{s: header}
	var out []Challenge
	for {
		p.skipSpaceAndCommas()
		if p.eof() {
			break
		}
		scheme := p.token()
		if scheme == "" {
			return nil, fmt.Errorf("auth: malformed challenge at offset %d", p.i)
		}
		c := Challenge{Scheme: strings.ToLower(scheme), Params: map[string]string{}}
		for {
			p.skipSpace()
			save := p.i
			name := p.token()
			p.skipSpace()
			if name == "" || p.eof() || p.s[p.i] != '=' {
				// Not a parameter: the start of the next challenge (or the end).
				p.i = save
				break
			}
			p.i++ // '='
			p.skipSpace()
			var val string
			if !p.eof() && p.s[p.i] == '"' {
				v, err := p.quoted()
				if err != nil {
					return nil, err
				}
				val = v
			} else {
				val = p.value()
			}
			c.Params[strings.ToLower(name)] = val
			p.skipSpace()
			if p.eof() {
				break
			}
			if p.s[p.i] != ',' {
				return nil, fmt.Errorf("auth: malformed challenge parameters at offset %d", p.i)
			}
			p.i++
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("auth: empty challenge")
	}
	return out, nil
}

type parser struct {
	s string
	i int
}

func (p *parser) eof() bool { return p.i >= len(p.s) }

func (p *parser) skipSpace() {
	for !p.eof() && (p.s[p.i] == ' ' || p.s[p.i] == '\t') {
		p.i++
	}
}

func (p *parser) skipSpaceAndCommas() {
	for !p.eof() && (p.s[p.i] == ' ' || p.s[p.i] == '\t' || p.s[p.i] == ',') {
		p.i++
	}
}

// token reads a scheme or parameter name: everything up to white space,
// '=', ',' or '"'.
func (p *parser) token() string { return p.until(" \t=,\"") }

// value reads an unquoted parameter value: everything up to white space or
// ','. It keeps '=' so that base64 and bare URLs with queries survive.
func (p *parser) value() string { return p.until(" \t,") }

func (p *parser) until(stop string) string {
	start := p.i
	for !p.eof() && strings.IndexByte(stop, p.s[p.i]) < 0 {
		p.i++
	}
	return p.s[start:p.i]
}

func (p *parser) quoted() (string, error) {
	p.i++ // opening quote
	var b strings.Builder
	for !p.eof() {
		c := p.s[p.i]
		switch c {
		case '"':
			p.i++
			return b.String(), nil
		case '\\':
			if p.i+1 < len(p.s) {
				b.WriteByte(p.s[p.i+1])
				p.i += 2
				continue
			}
		}
		b.WriteByte(c)
		p.i++
	}
	return "", fmt.Errorf("auth: unterminated quoted string in challenge")
}
