package main

import (
	"strings"
	"testing"

	"github.com/ngc-mirror/ngc-mirror/internal/ngctest"
)

// TestPortalBannerOffersNothing (U1 F8): as a captive portal the fake
// serves no images, so its banner lists none and no API key.
func TestPortalBannerOffersNothing(t *testing.T) {
	var b strings.Builder
	ngcBanner(&b, "http://127.0.0.1:1", "http://127.0.0.1:2", true)
	if out := b.String(); strings.Contains(out, ngctest.APIKey) || strings.Contains(out, ngctest.PytorchRepo) || !strings.Contains(out, "captive portal") {
		t.Errorf("portal banner: %q", out)
	}
	b.Reset()
	ngcBanner(&b, "http://127.0.0.1:1", "http://127.0.0.1:2", false)
	if out := b.String(); !strings.Contains(out, ngctest.APIKey) || !strings.Contains(out, ngctest.PytorchRepo) {
		t.Errorf("banner: %q", out)
	}
}
