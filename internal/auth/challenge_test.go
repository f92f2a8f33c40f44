package auth

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseChallenges(t *testing.T) {
	t.Parallel()
	type p = map[string]string
	tests := []struct {
		name   string
		header string
		want   []Challenge
	}{
		{
			name:   "nvcr.io first challenge, empty scope, no service",
			header: `Bearer realm="https://nvcr.io/proxy_auth",scope=""`,
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": "https://nvcr.io/proxy_auth", "scope": ""}}},
		},
		{
			name:   "docker style with service and scope",
			header: `Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:nvidia/cuda:pull"`,
			want: []Challenge{{Scheme: "bearer", Params: p{
				"realm":   "https://auth.example.com/token",
				"service": "registry.example.com",
				"scope":   "repository:nvidia/cuda:pull",
			}}},
		},
		{
			name:   "nvcr.io post-expiry challenge",
			header: `Bearer realm="https://authn.nvidia.com/token",service="registry",error="invalid_token"`,
			want: []Challenge{{Scheme: "bearer", Params: p{
				"realm":   "https://authn.nvidia.com/token",
				"service": "registry",
				"error":   "invalid_token",
			}}},
		},
		{
			name:   "basic realm",
			header: `Basic realm="Registry Realm"`,
			want:   []Challenge{{Scheme: "basic", Params: p{"realm": "Registry Realm"}}},
		},
		{
			name:   "scheme and parameter names are case-insensitive, values are not",
			header: `BEARER Realm="https://X.example/Token",SERVICE="Reg"`,
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": "https://X.example/Token", "service": "Reg"}}},
		},
		{
			name:   "quoted-pair escapes",
			header: `Bearer realm="https://r.example/t",error_description="say \"hi\" to C:\\dir\, ok"`,
			want: []Challenge{{Scheme: "bearer", Params: p{
				"realm":             "https://r.example/t",
				"error_description": `say "hi" to C:\dir, ok`,
			}}},
		},
		{
			name:   "comma and equals inside a quoted value",
			header: `Bearer realm="https://r.example/t",scope="repository:a/b:pull,push"`,
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": "https://r.example/t", "scope": "repository:a/b:pull,push"}}},
		},
		{
			name:   "realm with a query string",
			header: `Bearer realm="https://r.example/token?client=mirror&a=b",service="registry"`,
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": "https://r.example/token?client=mirror&a=b", "service": "registry"}}},
		},
		{
			name:   "unquoted token values, query and base64 padding survive",
			header: `Bearer realm=https://r.example/token?a=b,service=registry,sig=YWJj==`,
			want: []Challenge{{Scheme: "bearer", Params: p{
				"realm":   "https://r.example/token?a=b",
				"service": "registry",
				"sig":     "YWJj==",
			}}},
		},
		{
			name:   "white space around equals and commas",
			header: "Bearer  realm = \"https://r.example/t\" ,\tservice\t=\t\"reg\"  ",
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": "https://r.example/t", "service": "reg"}}},
		},
		{
			name:   "two challenges in one header",
			header: `Basic realm="basic-realm", Bearer realm="https://r.example/t",service="reg"`,
			want: []Challenge{
				{Scheme: "basic", Params: p{"realm": "basic-realm"}},
				{Scheme: "bearer", Params: p{"realm": "https://r.example/t", "service": "reg"}},
			},
		},
		{
			name:   "three challenges, one without parameters",
			header: `Negotiate, Bearer realm="https://r.example/t", Basic realm="b"`,
			want: []Challenge{
				{Scheme: "negotiate", Params: p{}},
				{Scheme: "bearer", Params: p{"realm": "https://r.example/t"}},
				{Scheme: "basic", Params: p{"realm": "b"}},
			},
		},
		{
			name:   "challenge with no parameters",
			header: `Basic`,
			want:   []Challenge{{Scheme: "basic", Params: p{}}},
		},
		{
			name:   "leading and trailing commas are list noise",
			header: ` , Basic realm="x" ,, `,
			want:   []Challenge{{Scheme: "basic", Params: p{"realm": "x"}}},
		},
		{
			name:   "empty quoted realm",
			header: `Bearer realm=""`,
			want:   []Challenge{{Scheme: "bearer", Params: p{"realm": ""}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseChallenges(tc.header)
			if err != nil {
				t.Fatalf("ParseChallenges(%q): %v", tc.header, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseChallenges(%q)\n got %#v\nwant %#v", tc.header, got, tc.want)
			}
		})
	}
}

func TestChallengeRealm(t *testing.T) {
	t.Parallel()
	cs, err := ParseChallenges(`Bearer realm="https://nvcr.io/proxy_auth",scope=""`)
	if err != nil {
		t.Fatal(err)
	}
	if got := cs[0].Realm(); got != "https://nvcr.io/proxy_auth" {
		t.Fatalf("Realm() = %q", got)
	}
	cs, err = ParseChallenges(`Basic`)
	if err != nil {
		t.Fatal(err)
	}
	if got := cs[0].Realm(); got != "" {
		t.Fatalf("Realm() of a challenge without one = %q, want empty", got)
	}
}

func TestParseChallengesErrors(t *testing.T) {
	t.Parallel()
	for _, header := range []string{
		``,
		`   `,
		"\t",
		`,,,`,
		`=`,
		`="x"`,
		`"Bearer" realm="x"`,
		`Bearer realm="https://nvcr.io/proxy_auth`,   // unterminated
		`Bearer realm="abc\`,                         // unterminated after a trailing backslash
		`Bearer realm="x" scope="y"`,                 // missing comma between parameters
		`Bearer realm="x"scope="y"`,                  // nothing between parameters
		`Bearer realm="x", service="y" "stray"`,      // stray quoted string
		`Basic realm="a", Bearer realm="b",error="c`, // unterminated in a later challenge
	} {
		got, err := ParseChallenges(header)
		if err == nil {
			t.Errorf("ParseChallenges(%q) = %#v, want an error", header, got)
			continue
		}
		if got != nil {
			t.Errorf("ParseChallenges(%q) returned challenges %#v along with error %v", header, got, err)
		}
		if !strings.HasPrefix(err.Error(), "auth: ") {
			t.Errorf("ParseChallenges(%q) error %q lacks the package prefix", header, err)
		}
	}
}

func FuzzParseChallenges(f *testing.F) {
	for _, s := range []string{
		`Bearer realm="https://nvcr.io/proxy_auth",scope=""`,
		`Bearer realm="https://authn.nvidia.com/token",service="registry",error="invalid_token"`,
		`Basic realm="x", Bearer realm="y",service="z"`,
		`Bearer realm="a\"b\\c"`,
		`Bearer realm=https://r/t?a=b`,
		`Negotiate, Basic`,
		`Bearer realm="abc\`,
		`Bearer realm="x" scope="y"`,
		`=`,
		``,
		`,,, ,`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		cs, err := ParseChallenges(header)
		if err != nil {
			if cs != nil {
				t.Fatalf("error %v with non-nil result %#v", err, cs)
			}
			return
		}
		if len(cs) == 0 {
			t.Fatalf("no error and no challenges for %q", header)
		}
		for _, c := range cs {
			if c.Scheme == "" || c.Scheme != strings.ToLower(c.Scheme) {
				t.Fatalf("bad scheme %q from %q", c.Scheme, header)
			}
			if strings.ContainsAny(c.Scheme, " \t,=\"") {
				t.Fatalf("scheme %q contains a separator, from %q", c.Scheme, header)
			}
			if c.Params == nil {
				t.Fatalf("nil Params from %q", header)
			}
			for k := range c.Params {
				if k == "" || k != strings.ToLower(k) {
					t.Fatalf("bad parameter name %q from %q", k, header)
				}
			}
		}
	})
}
