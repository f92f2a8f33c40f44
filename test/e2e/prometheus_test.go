//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ngc-mirror/ngc-mirror/internal/testsupport"
)

// startPrometheus runs a real Prometheus on loopback scraping target every
// second, with the repository's alert rules loaded. It returns its base URL.
func startPrometheus(t *testing.T, target string) string {
	t.Helper()
	dir := t.TempDir()
	rules, err := filepath.Abs("../../deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: ngc-mirror
    static_configs:
      - targets: [%q]
`, rules, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	log := &syncBuffer{}
	cmd := exec.Command("prometheus",
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
	)
	cmd.Stdout, cmd.Stderr = log, log
	t.Cleanup(func() { // after prometheus stopped
		if t.Failed() {
			t.Logf("prometheus log:\n%s", log.String())
		}
	})
	if _, err := testsupport.Start(t, cmd, os.Kill); err != nil {
		t.Fatalf("PROMETHEUS DID NOT START: %v", err)
	}
	base := "http://" + addr
	if !testsupport.Until(30*time.Second, 100*time.Millisecond, func() bool {
		resp, rerr := http.Get(base + "/-/ready")
		if err = rerr; err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}) {
		t.Fatalf("prometheus not ready: %v\n%s", err, log.String())
	}
	return base
}

type promResult struct {
	Status string `json:"status"`
	Error  string `json:"error"`
	Data   struct {
		Result []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	} `json:"data"`
}

func promQuery(t *testing.T, base, expr string) promResult {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r promResult
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("query %q: %v: %s", expr, err, body)
	}
	return r
}

// scalar returns the single value of an instant query, or NaN.
func scalar(t *testing.T, r promResult) float64 {
	t.Helper()
	if len(r.Data.Result) != 1 {
		return math.NaN()
	}
	v, _ := strconv.ParseFloat(r.Data.Result[0].Value[1].(string), 64)
	return v
}

// grafanaExpr replaces the dashboard's Grafana variables so that
// Prometheus can evaluate the expression.
func grafanaExpr(e string) string {
	return strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "5m", `"$job"`, `".*"`).Replace(e)
}

// TestDashboardAndAlertsOnRealPrometheus: a real Prometheus scrapes the
// mirror while a test pulls a multi-layer image cold, then hot. Every panel
// query of the Grafana dashboard and every alert rule must evaluate, and the
// hit-ratio and bytes panels must show what the pulls caused.
func TestDashboardAndAlertsOnRealPrometheus(t *testing.T) {
	need(t, "prometheus", "promtool")
	if out, err := run(t, time.Minute, "promtool", "check", "rules", "../../deploy/prometheus/alerts.yml"); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	up, fx := newUpstream(t)
	m := startMirror(t, up.URL())
	prom := startPrometheus(t, m.addr)

	// A first scrape before any pull, so that rates start from zero.
	if !testsupport.Until(30*time.Second, 200*time.Millisecond, func() bool { return scalar(t, promQuery(t, prom, `up{job="ngc-mirror"}`)) == 1 }) {
		t.Fatal("prometheus never scraped the mirror")
	}
	im := fx.Pytorch.Child("linux/amd64")
	var bodyBytes int64
	pull := func() {
		paths := []string{"/v2/nvidia/pytorch/manifests/" + im.Manifest.Digest.String()}
		for _, b := range im.Blobs() {
			paths = append(paths, "/v2/nvidia/pytorch/blobs/"+b.Digest.String())
		}
		var n int64
		for _, p := range paths {
			resp, err := http.Get("http://" + m.addr + p)
			if err != nil {
				t.Fatal(err)
			}
			c, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("%s: %d", p, resp.StatusCode)
			}
			n += c
		}
		bodyBytes = n
	}
	pull()            // cold: all misses
	waitNoFills(t, m) // the last commits finish (clients got their bytes once verified)
	pull()            // hot: all hits

	// Wait until Prometheus has scraped the final counters.
	if !testsupport.Until(30*time.Second, 200*time.Millisecond, func() bool {
		return scalar(t, promQuery(t, prom, `sum(ngc_mirror_served_bytes_total{source="cache"})`)) == float64(bodyBytes)
	}) {
		t.Fatalf("prometheus never saw %d cache bytes", bodyBytes)
	}

	raw, err := os.ReadFile("../../deploy/grafana/ngc-mirror.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if len(dash.Panels) < 8 {
		t.Fatalf("dashboard has %d panels", len(dash.Panels))
	}
	checked := map[string]bool{}
	for _, p := range dash.Panels {
		for i, tg := range p.Targets {
			r := promQuery(t, prom, grafanaExpr(tg.Expr))
			if r.Status != "success" {
				t.Errorf("panel %q target %d does not evaluate: %s", p.Title, i, r.Error)
				continue
			}
			switch {
			case strings.HasPrefix(p.Title, "Cache hit ratio") && i == 0:
				if v := scalar(t, r); math.Abs(v-0.5) > 1e-9 {
					t.Errorf("panel %q = %v, want 0.5 (one cold and one hot pull)", p.Title, v)
				}
				checked[p.Title] = true
			case p.Title == "Uplink bytes saved (since start)":
				if v := scalar(t, r); v != float64(bodyBytes) {
					t.Errorf("panel %q = %v, want %d", p.Title, v, bodyBytes)
				}
				checked[p.Title] = true
			case p.Title == "Bytes served by source (since start)":
				got := map[string]string{}
				for _, s := range r.Data.Result {
					got[s.Metric["source"]] = s.Value[1].(string)
				}
				want := strconv.FormatInt(bodyBytes, 10)
				if got["cache"] != want || got["upstream"] != want {
					t.Errorf("panel %q = %v, want cache=upstream=%s", p.Title, got, want)
				}
				checked[p.Title] = true
			}
		}
	}
	if len(checked) != 4 {
		t.Errorf("checked the values of %d of the 4 ratio and bytes panels: %v", len(checked), checked)
	}

	// Every alert rule's expression evaluates.
	rulesRaw, err := os.ReadFile("../../deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(rulesRaw, &rules); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, g := range rules.Groups {
		for _, rule := range g.Rules {
			n++
			if r := promQuery(t, prom, rule.Expr); r.Status != "success" {
				t.Errorf("alert %s does not evaluate: %s", rule.Alert, r.Error)
			}
		}
	}
	if n < 4 {
		t.Fatalf("only %d alert rules", n)
	}
	// The mirror is up and healthy: the down and hit-ratio alerts are quiet.
	if r := promQuery(t, prom, `ALERTS{alertname="NGCMirrorDown"}`); len(r.Data.Result) != 0 {
		t.Errorf("NGCMirrorDown is active: %v", r.Data.Result)
	}
}
