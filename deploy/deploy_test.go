// Package deploy holds the deployment files (Kubernetes, Prometheus,
// Grafana, systemd); its test validates them.
package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
)

// object is the part of a Kubernetes object the checks read.
type object map[string]any

func (o object) str(path ...string) string {
	v, _ := o.get(path...).(string)
	return v
}

func (o object) get(path ...string) any {
	var cur any = map[string]any(o)
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[p]
	}
	return cur
}

func (o object) list(path ...string) []any {
	l, _ := o.get(path...).([]any)
	return l
}

// need fails t unless every tool is on PATH: the deploy checks run the
// real tools and never skip.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed: run .ci/install.sh", tool)
		}
	}
}

// decodeYAML splits a multi-document YAML stream into objects, skipping
// empty documents. Each is decoded into a plain map: into object, yaml.v3
// would make every nested map an object too, and the checks expect
// map[string]any.
func decodeYAML(raw []byte) ([]object, error) {
	var objs []object
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	for {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, err
		}
		if m != nil {
			objs = append(objs, object(m))
		}
	}
}

// decodeFile reads path into v: JSON for a .json file, YAML otherwise.
// It fails t, naming the file, if it cannot.
func decodeFile(t *testing.T, path string, v any) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err == nil && filepath.Ext(path) == ".json" {
		err = json.Unmarshal(raw, v)
	} else if err == nil {
		err = yaml.Unmarshal(raw, v)
	}
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// output runs cmd, a real tool that must be on PATH (need), and returns
// its stdout and, apart, its stderr, so that no warning mixes into the
// YAML it renders.
func output(t *testing.T, cmd *exec.Cmd) (out, stderr []byte, err error) {
	t.Helper()
	need(t, cmd.Args[0])
	var buf bytes.Buffer
	cmd.Stderr = &buf
	out, err = cmd.Output()
	return out, buf.Bytes(), err
}

// kustomize renders dir with the real kustomize (kubectl kustomize,
// offline); stderr goes into the failure, not into the YAML.
func kustomize(t *testing.T, dir string) []byte {
	t.Helper()
	out, stderr, err := output(t, exec.Command("kubectl", "kustomize", dir))
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, stderr)
	}
	return out
}

// byKind indexes objects by kind (the last of a kind wins).
func byKind(objs []object) map[string]object {
	m := map[string]object{}
	for _, o := range objs {
		m[o.str("kind")] = o
	}
	return m
}

func loadManifests(t *testing.T) map[string]object {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no Kubernetes manifests: %v", err)
	}
	var all []object
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := decodeYAML(raw)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, o := range objs {
			if o.str("apiVersion") == "" || o.str("kind") == "" {
				t.Fatalf("%s: object without apiVersion or kind", f)
			}
			if o.str("kind") != "Kustomization" && o.str("metadata", "name") == "" {
				t.Fatalf("%s: %s without metadata.name", f, o.str("kind"))
			}
		}
		all = append(all, objs...)
	}
	return byKind(all)
}

// TestKubernetesManifests parses every manifest and checks that the pieces
// refer to each other correctly.
func TestKubernetesManifests(t *testing.T) {
	t.Parallel()
	objs := loadManifests(t)
	for _, k := range []string{"Namespace", "StatefulSet", "Service", "ServiceMonitor", "DaemonSet", "Kustomization"} {
		if objs[k] == nil {
			t.Fatalf("no %s", k)
		}
	}
	// Re-applying must never overwrite the real API key: no Secret here.
	if objs["Secret"] != nil {
		t.Error("a Secret is part of the manifests: kubectl apply -k would overwrite the real key")
	}
	// Every kustomization resource exists.
	for _, r := range objs["Kustomization"].list("resources") {
		if _, err := os.Stat(filepath.Join("kubernetes", r.(string))); err != nil {
			t.Errorf("kustomization resource %v: %v", r, err)
		}
	}
	sts := objs["StatefulSet"]
	sel := sts.get("spec", "selector", "matchLabels").(map[string]any)
	tmpl := sts.get("spec", "template", "metadata", "labels").(map[string]any)
	for k, v := range sel {
		if tmpl[k] != v {
			t.Errorf("StatefulSet selector %s=%v does not match the pod labels", k, v)
		}
	}
	if sts.str("spec", "serviceName") != objs["Service"].str("metadata", "name") {
		t.Error("StatefulSet serviceName is not the Service's name")
	}
	containers := sts.list("spec", "template", "spec", "containers")
	if len(containers) != 1 {
		t.Fatalf("%d containers", len(containers))
	}
	c := object(containers[0].(map[string]any))
	if c.str("image") == "" {
		t.Error("container without image")
	}
	ports := map[string]bool{}
	for _, p := range c.list("ports") {
		ports[object(p.(map[string]any)).str("name")] = true
	}
	if c.str("readinessProbe", "httpGet", "path") != "/readyz" || c.str("livenessProbe", "httpGet", "path") != "/healthz" {
		t.Error("probes must use /readyz and /healthz")
	}
	if !ports[c.str("readinessProbe", "httpGet", "port")] {
		t.Error("readiness probe names an unknown port")
	}
	volumes := map[string]object{}
	for _, v := range sts.list("spec", "template", "spec", "volumes") {
		o := object(v.(map[string]any))
		volumes[o.str("name")] = o
	}
	for _, v := range sts.list("spec", "volumeClaimTemplates") {
		o := object(v.(map[string]any))
		volumes[o.str("metadata", "name")] = o
	}
	for _, m := range c.list("volumeMounts") {
		name := object(m.(map[string]any)).str("name")
		if volumes[name] == nil {
			t.Errorf("volume mount %q has no volume", name)
		}
	}
	// The ConfigMap comes from the generator (a content hash in its name,
	// so a changed configuration rolls the pod).
	kust := objs["Kustomization"]
	var gen object
	for _, g := range kust.list("configMapGenerator") {
		if o := object(g.(map[string]any)); o.str("name") == volumes["config"].str("configMap", "name") {
			gen = o
		}
	}
	if gen == nil {
		t.Fatalf("config volume names ConfigMap %q, which no configMapGenerator makes", volumes["config"].str("configMap", "name"))
	}
	if opts, _ := gen.get("options").(map[string]any); opts["disableNameSuffixHash"] == true {
		t.Error("the ConfigMap generator disables the hash suffix: a changed configuration would not roll the pod")
	}
	// The secret is made by hand with the command the kustomization
	// documents; the volume names that secret and key.
	secret := volumes["api-key"].str("secret", "secretName")
	raw, err := os.ReadFile("kubernetes/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if want := "create secret generic " + secret + " --from-literal=api-key="; !strings.Contains(string(raw), want) {
		t.Errorf("kustomization.yaml does not document %q", want)
	}
	// The configuration file is a valid mirror configuration that reads the
	// mounted API key and keeps the cache on the volume.
	// (Decoded and validated as config.Load does, without reading the key
	// file, which exists only in the pod.)
	rawCfg, err := os.ReadFile("kubernetes/config/mirror.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cdec := yaml.NewDecoder(bytes.NewReader(rawCfg))
	cdec.KnownFields(true)
	if err := cdec.Decode(&cfg); err != nil {
		t.Fatalf("kubernetes/config/mirror.yaml: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("kubernetes/config/mirror.yaml: %v", err)
	}
	if cfg.Upstream.APIKeyFile != "/etc/ngc-mirror/secret/api-key" || cfg.Storage.DataDir != "/data" {
		t.Errorf("kubernetes/config/mirror.yaml: api_key_file %q, data_dir %q", cfg.Upstream.APIKeyFile, cfg.Storage.DataDir)
	}
	// Service selects the pods and exposes the named port; the
	// ServiceMonitor scrapes that port.
	svc := objs["Service"]
	for k, v := range svc.get("spec", "selector").(map[string]any) {
		if tmpl[k] != v {
			t.Errorf("Service selector %s=%v selects no mirror pod", k, v)
		}
	}
	svcPorts := map[string]object{}
	for _, p := range svc.list("spec", "ports") {
		o := object(p.(map[string]any))
		svcPorts[o.str("name")] = o
		if !ports[o.str("targetPort")] {
			t.Errorf("Service targetPort %q is not a container port", o.str("targetPort"))
		}
	}
	for _, ep := range objs["ServiceMonitor"].list("spec", "endpoints") {
		o := object(ep.(map[string]any))
		if svcPorts[o.str("port")] == nil || o.str("path") != "/metrics" {
			t.Errorf("ServiceMonitor endpoint %v does not match the Service", o)
		}
	}
	// The DaemonSet writes containerd's hosts.toml for nvcr.io pointing at
	// the Service's node port, with nvcr.io as the fallback server.
	ds := objs["DaemonSet"]
	var script string
	for _, ic := range ds.list("spec", "template", "spec", "initContainers") {
		for _, s := range object(ic.(map[string]any)).list("command") {
			script += s.(string) + "\n"
		}
	}
	nodePort := svcPorts["registry"]["nodePort"]
	for _, want := range []string{"certs.d/nvcr.io/hosts.toml", `server = "https://nvcr.io"`, `capabilities = ["pull", "resolve"]`, ":" + toString(nodePort)} {
		if !strings.Contains(script, want) {
			t.Errorf("DaemonSet script lacks %q", want)
		}
	}
}

func toString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestKustomizeBuild renders deploy/kubernetes with the real kustomize
// (kubectl kustomize, offline) and checks what a cluster would get: no
// Secret, a pinned image, the generated ConfigMap (hash-suffixed name)
// mounted as a directory without subPath, and the mirror pointed at the
// file in it for serve and for commands run in the pod.
func TestKustomizeBuild(t *testing.T) {
	t.Parallel()
	out := kustomize(t, "kubernetes")
	objs := byKind(decodeObjects(t, out))
	if objs["Secret"] != nil {
		t.Error("the kustomization renders a Secret: re-applying would overwrite the real key")
	}
	cm, sts := objs["ConfigMap"], objs["StatefulSet"]
	if cm == nil || sts == nil {
		t.Fatalf("rendered no ConfigMap or StatefulSet:\n%s", out)
	}
	cmName := cm.str("metadata", "name")
	if !strings.HasPrefix(cmName, "ngc-mirror-config-") {
		t.Errorf("ConfigMap %q has no content hash suffix", cmName)
	}
	c := object(sts.list("spec", "template", "spec", "containers")[0].(map[string]any))
	img := c.str("image")
	name, tag, ok := strings.Cut(img[strings.LastIndexByte(img, '/')+1:], ":")
	if !ok || tag == "" || tag == "latest" || name == "" {
		t.Errorf("image %q: want a pinned tag, not latest", img)
	}
	var cfgPath string
	for _, e := range c.list("env") {
		if o := object(e.(map[string]any)); o.str("name") == "MIRROR_CONFIG" {
			cfgPath = o.str("value")
		}
	}
	var mountPath string
	for _, m := range c.list("volumeMounts") {
		o := object(m.(map[string]any))
		if o.str("name") != "config" {
			continue
		}
		if o.str("subPath") != "" {
			t.Error("the configuration is mounted with subPath: ConfigMap updates never reach the pod")
		}
		mountPath = o.str("mountPath")
	}
	if cfgPath == "" || filepath.Dir(cfgPath) != mountPath {
		t.Errorf("MIRROR_CONFIG %q is not a file in the config mount %q", cfgPath, mountPath)
	}
	if _, ok := cm.get("data").(map[string]any)[filepath.Base(cfgPath)]; !ok {
		t.Errorf("the ConfigMap has no %s", filepath.Base(cfgPath))
	}
	for _, v := range sts.list("spec", "template", "spec", "volumes") {
		if o := object(v.(map[string]any)); o.str("name") == "config" && o.str("configMap", "name") != cmName {
			t.Errorf("config volume names %q, not the generated %q (no rollout on change)", o.str("configMap", "name"), cmName)
		}
	}
}

// TestComposeFile validates docker-compose.yml with Debian's docker-compose
// and checks the services and mounts it must have.
func TestComposeFile(t *testing.T) {
	t.Parallel()
	var c struct {
		Services map[string]struct {
			Volumes []string `yaml:"volumes"`
		} `yaml:"services"`
	}
	decodeFile(t, "../docker-compose.yml", &c)
	for _, s := range []string{"mirror", "redis", "prometheus", "grafana"} {
		if _, ok := c.Services[s]; !ok {
			t.Errorf("compose has no %s service", s)
		}
	}
	for _, s := range c.Services {
		for _, v := range s.Volumes {
			// ${NAME:-default} as with an empty environment.
			v = regexp.MustCompile(`\$\{[A-Z_]+:-([^}]*)\}`).ReplaceAllString(v, "$1")
			src, _, _ := strings.Cut(v, ":")
			if strings.HasPrefix(src, "./") {
				if _, err := os.Stat(filepath.Join("..", src)); err != nil {
					t.Errorf("compose mounts %s, which does not exist", src)
				}
			}
		}
	}
	need(t, "docker-compose")
	cmd := exec.Command("docker-compose", "-f", "docker-compose.yml", "config", "--quiet")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("docker-compose config: %v\n%s", err, out)
	}
}

// TestSystemdUnit checks the unit's required keys, and that following its
// install steps (the sed on configs/mirror.yaml, run with the real sed)
// puts the data directory in /etc/ngc-mirror/mirror.yaml, the file the
// unit serves with and the operator commands read by default, rather than
// in the unit's environment, which those commands never see.
func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("systemd/ngc-mirror.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(raw)
	for _, want := range []string{"[Unit]", "[Service]", "[Install]", "ExecStart=/usr/local/bin/mirror serve --config " + config.DefaultPath,
		"StateDirectory=ngc-mirror", "install -m 0755 bin/mirror /usr/local/bin/mirror", "WantedBy=multi-user.target"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	if strings.Contains(unit, "MIRROR_DATA_DIR") {
		t.Error("the unit sets MIRROR_DATA_DIR: mirror prefetch/tags/jobs/fsck would not find that data directory")
	}
	var sed string
	for _, l := range strings.Split(unit, "\n") {
		if s, ok := strings.CutPrefix(l, "#   sed -i "); ok {
			sed = s
		}
	}
	i := strings.LastIndexByte(sed, ' ')
	if i < 0 || sed[i+1:] != config.DefaultPath {
		t.Fatalf("no install step editing %s with sed: %q", config.DefaultPath, sed)
	}
	shipped, err := os.ReadFile("../configs/mirror.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(t.TempDir(), "mirror.yaml")
	if err := os.WriteFile(cfgFile, shipped, 0o644); err != nil {
		t.Fatal(err)
	}
	expr := sed[:i]
	if out, err := exec.Command("sh", "-c", "sed -i "+expr+" "+cfgFile).CombinedOutput(); err != nil {
		t.Fatalf("sed -i %s: %v\n%s", expr, err, out)
	}
	cfg, err := config.Load(cfgFile, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Storage.DataDir != "/var/lib/ngc-mirror" {
		t.Errorf("after the install steps storage.data_dir is %q, want the unit's StateDirectory /var/lib/ngc-mirror", cfg.Storage.DataDir)
	}
}

// TestGrafanaProvisioning checks that the datasource uid the dashboard uses
// is the provisioned one.
func TestGrafanaProvisioning(t *testing.T) {
	t.Parallel()
	var ds struct {
		Datasources []struct {
			UID  string `yaml:"uid"`
			Type string `yaml:"type"`
		} `yaml:"datasources"`
	}
	decodeFile(t, "grafana/provisioning/datasources/prometheus.yml", &ds)
	if len(ds.Datasources) != 1 {
		t.Fatalf("datasource provisioning: %d datasources, want 1", len(ds.Datasources))
	}
	var d struct {
		Panels []struct {
			Datasource struct{ UID, Type string } `json:"datasource"`
		} `json:"panels"`
	}
	decodeFile(t, "grafana/ngc-mirror.json", &d)
	for i, p := range d.Panels {
		if p.Datasource.UID != ds.Datasources[0].UID || p.Datasource.Type != ds.Datasources[0].Type {
			t.Errorf("panel %d uses datasource %+v, not the provisioned one", i, p.Datasource)
		}
	}
}
