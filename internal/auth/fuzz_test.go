package auth

import (
	"testing"
	"time"
)

// FuzzParseTokenResponse: token response parsing never panics, and a token
// it accepts is non-empty and expires after it should be refreshed, within
// the lifetime cap.
func FuzzParseTokenResponse(f *testing.F) {
	for _, seed := range []string{
		`{"token":"abc","expires_in":600}`,
		`{"access_token":"abc"}`,
		`{"token":"abc","expires_in":300,"issued_at":"2026-01-01T00:00:00Z"}`,
		`{"token":"","access_token":""}`,
		`{"token":"x","expires_in":99999999999999}`,
		`<html>`,
	} {
		f.Add([]byte(seed))
	}
	now := time.Date(2026, 1, 1, 0, 5, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, body []byte) {
		tok, err := parseTokenResponse(body, now)
		if err != nil {
			return
		}
		if tok.value == "" {
			t.Fatal("accepted an empty token")
		}
		if !tok.refreshAt.Before(tok.expiresAt) || tok.expiresAt.Sub(now) > maxTokenLifetime {
			t.Fatalf("refresh %v, expiry %v", tok.refreshAt, tok.expiresAt)
		}
	})
}
