package ocierr

import (
	"io"
	"net/http/httptest"
	"testing"
)

func TestWriteDecode(t *testing.T) {
	rec := httptest.NewRecorder()
	Write(rec, 404, New("NAME_UNKNOWN", "repository unknown"))
	res := rec.Result()
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != 404 || res.Header.Get("Content-Type") != "application/json; charset=utf-8" ||
		string(body) != `{"errors":[{"code":"NAME_UNKNOWN","message":"repository unknown"}]}`+"\n" {
		t.Fatalf("%d %v %s", res.StatusCode, res.Header, body)
	}
	env, ok := Decode(body)
	if !ok || env.Error() != "NAME_UNKNOWN: repository unknown" {
		t.Fatalf("Decode = %+v %v", env, ok)
	}
	for _, b := range []string{"<html>", `{"errors":[]}`, ""} {
		if _, ok := Decode([]byte(b)); ok {
			t.Errorf("Decode(%q) ok", b)
		}
	}
}
