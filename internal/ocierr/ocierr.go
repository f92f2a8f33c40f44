// Package ocierr is the error envelope of the OCI distribution spec ("Error
// Codes"): {"errors":[{"code":"NAME_UNKNOWN","message":"...","detail":...}]}.
// The registry API (internal/proxy) and the admin API (internal/admin)
// answer errors with it, and the admin CLI (cmd/mirror) reads it back.
package ocierr

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Error is one entry of an envelope. Code is an OCI error code
// (MANIFEST_UNKNOWN, ...) or one of the admin API's own (RULE_INVALID, ...);
// Message is written for the client and never carries secrets.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// Envelope is the body of an error response.
type Envelope struct {
	Errors []Error `json:"errors"`
}

// New returns the envelope of one error.
func New(code, message string) Envelope {
	return Envelope{Errors: []Error{{Code: code, Message: message}}}
}

// Error returns "CODE: message" of the first error.
func (e Envelope) Error() string {
	if len(e.Errors) == 0 {
		return "no error"
	}
	return e.Errors[0].Code + ": " + e.Errors[0].Message
}

// Write answers status with env as compact JSON (one line). Content-Type
// and Content-Length are set; other headers are the caller's.
func Write(w http.ResponseWriter, status int, env Envelope) {
	body, _ := json.Marshal(env)
	body = append(body, '\n')
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// Decode reads an envelope from an error response body; ok is false when
// the body is not one (a proxy's HTML page, say).
func Decode(body []byte) (env Envelope, ok bool) {
	if err := json.Unmarshal(body, &env); err != nil || len(env.Errors) == 0 {
		return Envelope{}, false
	}
	return env, true
}
