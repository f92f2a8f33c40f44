package ngctag

import (
	"slices"
	"testing"
)

// Shapes seen on nvcr.io (see ../shared notes and NGC catalog pages).
func TestParse(t *testing.T) {
	for _, c := range []struct {
		tag              string
		monthly          bool
		release, variant string
	}{
		{"24.05-py3", true, "24.05", "py3"},
		{"23.12-tf2-py3", true, "23.12", "tf2-py3"},
		{"24.05-py3-igpu", true, "24.05", "py3-igpu"},
		{"24.05-py3-sdk", true, "24.05", "py3-sdk"},
		{"24.05-py3-min", true, "24.05", "py3-min"},
		{"24.05-trtllm-python-py3", true, "24.05", "trtllm-python-py3"},
		{"24.04-cuda12.0-py3.11", true, "24.04", "cuda12.0-py3.11"},
		{"18.01-py3", true, "18.01", "py3"},
		{"17.12", true, "17.12", ""},
		{"24.10", true, "24.10", ""},
		{"12.4.1-base-ubuntu22.04", false, "", ""},
		{"12.8.0-cudnn-devel-ubuntu24.04", false, "", ""},
		{"11.8.0-runtime-ubi8", false, "", ""},
		{"3.3.5-3.4.0-ubuntu22.04", false, "", ""},
		{"sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.sig", false, "", ""},
		{"latest", false, "", ""},
		{"24.13-py3", false, "", ""}, // no month 13
		{"24.5-py3", false, "", ""},  // one-digit month
		{"16.12-py3", false, "", ""}, // before NGC's first release
		{"24.05-", false, "", ""},    // empty variant
		{"24.05.1-py3", false, "", ""},
		{"v24.05-py3", false, "", ""},
		{"r24.05", false, "", ""},
	} {
		got := Parse(c.tag)
		want := Tag{Name: c.tag, Monthly: c.monthly, Release: c.release, Variant: c.variant}
		if got != want {
			t.Errorf("Parse(%q) = %+v, want %+v", c.tag, got, want)
		}
	}
}

func TestLatestReleases(t *testing.T) {
	var tags []Tag
	for _, n := range []string{"24.03-py3", "24.05-py3", "24.05-py3-igpu", "23.12-py3", "latest", "24.04-py3", "12.4.1-base-ubuntu22.04"} {
		tags = append(tags, Parse(n))
	}
	if got := LatestReleases(tags, 2); !slices.Equal(got, []string{"24.05", "24.04"}) {
		t.Errorf("latest 2 = %v", got)
	}
	if got := LatestReleases(tags, 10); !slices.Equal(got, []string{"24.05", "24.04", "24.03", "23.12"}) {
		t.Errorf("latest 10 = %v", got)
	}
	if !Newer("24.05", "24.04") || Newer("23.12", "24.01") || !Newer("17.12", "") {
		t.Error("Newer")
	}
}
