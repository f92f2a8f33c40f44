package deploy

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
)

// The scale-out deploy files (Helm chart, kustomize overlay, compose
// profile) are checked here on what a cluster would run: the rendered
// objects, and the mirror configuration a replica would load from them with
// config.Load.

// Cluster settings the deploy files use before the cluster core (#11, S1)
// is part of config: while config.Config has no `cluster` section, the
// chart's cluster block and these variables are checked for their shape
// only; once it has, config.Load must read each of them.
var pendingClusterEnv = []string{"MIRROR_CLUSTER_ADVERTISE", "MIRROR_CLUSTER_SECRET"}

// clusterInConfig reports whether config.Config has a `cluster` section.
func clusterInConfig() bool {
	t := reflect.TypeOf(config.Config{})
	for i := range t.NumField() {
		if strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0] == "cluster" {
			return true
		}
	}
	return false
}

// decodeObjects splits a multi-document YAML stream into objects, each
// with an apiVersion, kind and name.
func decodeObjects(t *testing.T, raw []byte) []object {
	t.Helper()
	objs, err := decodeYAML(raw)
	if err != nil {
		t.Fatalf("rendered YAML: %v\n%s", err, raw)
	}
	for _, o := range objs {
		if o.str("apiVersion") == "" || o.str("kind") == "" || o.str("metadata", "name") == "" {
			t.Fatalf("object without apiVersion, kind or name: %v", o)
		}
	}
	return objs
}

// helmTemplate renders deploy/helm/ngc-mirror with the real helm binary.
func helmTemplate(t *testing.T, sets ...string) ([]object, []byte, error) {
	t.Helper()
	args := []string{"template", "ngc-mirror", "helm/ngc-mirror", "--namespace", "ngc-mirror"}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	out, stderr, err := output(t, exec.Command("helm", args...))
	if err != nil {
		return nil, stderr, err
	}
	return decodeObjects(t, out), out, nil
}

func asMap(v any) map[string]any {
	m, _ := v.(map[string]any)
	return m
}

// selects reports whether a matchLabels-style selector selects labels.
func selects(sel, labels map[string]any) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// workload is a Deployment, StatefulSet or DaemonSet with its pod template.
type workload struct {
	obj    object
	labels map[string]any
	spec   object
}

func workloads(objs []object) []workload {
	var ws []workload
	for _, o := range objs {
		switch o.str("kind") {
		case "Deployment", "StatefulSet", "DaemonSet", "Job":
			ws = append(ws, workload{obj: o, labels: asMap(o.get("spec", "template", "metadata", "labels")), spec: object(asMap(o.get("spec", "template", "spec")))})
		}
	}
	return ws
}

func firstContainer(w workload) object {
	cs := w.spec.list("containers")
	if len(cs) == 0 {
		return nil
	}
	return object(asMap(cs[0]))
}

func isMirror(w workload) bool {
	c := firstContainer(w)
	if c == nil {
		return false
	}
	var cmd []string
	for _, s := range c.list("command") {
		cmd = append(cmd, fmt.Sprint(s))
	}
	return slices.Equal(cmd, []string{"/mirror", "serve"})
}

// podEnv resolves a container's environment as the kubelet would for the
// mirror process: downward-API fields and Secret keys get stand-in values,
// $(VAR) refers to variables defined before. It fails on a secret given
// inline rather than from a Secret.
func podEnv(t *testing.T, c object, podIP string) (env map[string]string, order []string) {
	t.Helper()
	env = map[string]string{}
	ref := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	for _, e := range c.list("env") {
		o := object(asMap(e))
		name := o.str("name")
		switch {
		case o.get("valueFrom", "fieldRef") != nil:
			if o.str("valueFrom", "fieldRef", "fieldPath") != "status.podIP" {
				t.Errorf("env %s: unexpected fieldRef %v", name, o.get("valueFrom", "fieldRef"))
			}
			env[name] = podIP
		case o.get("valueFrom", "secretKeyRef") != nil:
			s := object(asMap(o.get("valueFrom", "secretKeyRef")))
			if s.str("name") == "" || s.str("key") == "" {
				t.Errorf("env %s: secretKeyRef without name or key", name)
			}
			// A stand-in long enough for cluster.secret's minimum.
			env[name] = "from-secret-" + s.str("name") + "-" + s.str("key")
			if name == "MIRROR_REDIS_URL" {
				env[name] = "redis://:password@redis.lab:6379/0"
			}
		default:
			v := o.str("value")
			env[name] = ref.ReplaceAllStringFunc(v, func(m string) string {
				r := ref.FindStringSubmatch(m)[1]
				if !slices.Contains(order, r) {
					t.Errorf("env %s refers to $(%s), which is not defined before it", name, r)
				}
				return env[r]
			})
		}
		order = append(order, name)
	}
	return env, order
}

// secretEnv are the variables that carry secrets: they must come from a
// Secret, never be written into the manifests.
var secretEnv = []string{"NGC_API_KEY", "MIRROR_CLUSTER_SECRET", "MIRROR_S3_SECRET_KEY", "MIRROR_ADMIN_TOKEN", "MIRROR_REDIS_URL"}

// loadPodConfig loads the mirror configuration a container would: the file
// MIRROR_CONFIG names, from the ConfigMap mounted there, and the
// container's environment. It returns the configuration and the file's raw
// YAML tree.
func loadPodConfig(t *testing.T, objs []object, w workload, env map[string]string) (config.Config, map[string]any) {
	t.Helper()
	c := firstContainer(w)
	cfgPath := env["MIRROR_CONFIG"]
	if cfgPath == "" {
		t.Fatal("the mirror container has no MIRROR_CONFIG")
	}
	var cmName string
	for _, m := range c.list("volumeMounts") {
		mo := object(asMap(m))
		if mo.str("mountPath") != filepath.Dir(cfgPath) {
			continue
		}
		if mo.str("subPath") != "" {
			t.Error("the configuration is mounted with subPath: ConfigMap updates never reach the pod")
		}
		for _, v := range w.spec.list("volumes") {
			if vo := object(asMap(v)); vo.str("name") == mo.str("name") {
				cmName = vo.str("configMap", "name")
			}
		}
	}
	var data string
	for _, o := range objs {
		if o.str("kind") == "ConfigMap" && o.str("metadata", "name") == cmName {
			data = o.str("data", filepath.Base(cfgPath))
		}
	}
	if data == "" {
		t.Fatalf("MIRROR_CONFIG %s is not a file of a ConfigMap mounted in the pod (ConfigMap %q)", cfgPath, cmName)
	}
	var tree map[string]any
	if err := yaml.Unmarshal([]byte(data), &tree); err != nil {
		t.Fatalf("the mirror configuration: %v", err)
	}
	for _, k := range []string{"secret_key", "secret", "api_key", "password", "token"} {
		if strings.Contains(data, k+": ") && !strings.Contains(data, k+": \"\"") {
			t.Errorf("the configuration file sets %s: secrets belong in a Secret", k)
		}
	}
	file := data
	if !clusterInConfig() {
		// Not a key config.Load knows yet: check the rest.
		rest := map[string]any{}
		for k, v := range tree {
			if k != "cluster" {
				rest[k] = v
			}
		}
		raw, err := yaml.Marshal(rest)
		if err != nil {
			t.Fatal(err)
		}
		file = string(raw)
	}
	path := filepath.Join(t.TempDir(), "mirror.yaml")
	if err := os.WriteFile(path, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	return checkLoad(t, path, env, "MIRROR_CONFIG", "POD_IP"), tree
}

// checkLoad loads the configuration file at path with the environment env
// as config.Load does in the process, and checks that every variable of
// env, but those named in ignore, is one config.Load reads: without it the
// configuration differs.
func checkLoad(t *testing.T, path string, env map[string]string, ignore ...string) config.Config {
	t.Helper()
	cfg, err := config.Load(path, func(k string) string { return env[k] })
	if err != nil {
		raw, _ := os.ReadFile(path)
		t.Fatalf("the replica's configuration does not load: %v\n%s", err, raw)
	}
	for name := range env {
		if slices.Contains(ignore, name) {
			continue
		}
		with := func(v string) (config.Config, error) {
			return config.Load(path, func(k string) string {
				if k == name {
					return v
				}
				return env[k]
			})
		}
		// The value may be the default: then another value must change
		// the configuration or be refused.
		without, err := with("")
		probe, perr := with("probe-0123456789abcdef")
		if err == nil && reflect.DeepEqual(without, cfg) && perr == nil && reflect.DeepEqual(without, probe) {
			if !clusterInConfig() && slices.Contains(pendingClusterEnv, name) {
				continue
			}
			t.Errorf("env %s changes nothing config.Load reads: a misspelt name?", name)
		}
	}
	return cfg
}

// clusterValues returns the cluster section of the configuration a
// replica runs with: from config.Load once it has one, else from the file
// and the agreed variables.
func clusterValues(t *testing.T, cfg config.Config, tree map[string]any, env map[string]string) map[string]any {
	t.Helper()
	if clusterInConfig() {
		raw, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(raw, &m); err != nil {
			t.Fatal(err)
		}
		return asMap(m["cluster"])
	}
	cl := map[string]any{}
	for k, v := range asMap(tree["cluster"]) {
		cl[k] = v
	}
	if v := env["MIRROR_CLUSTER_ADVERTISE"]; v != "" {
		cl["advertise"] = v
	}
	if v := env["MIRROR_CLUSTER_SECRET"]; v != "" {
		cl["secret"] = v
	}
	return cl
}

func portNumber(t *testing.T, hostPort string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(hostPort)
	if err != nil {
		t.Fatalf("%q: %v", hostPort, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%q: %v", hostPort, err)
	}
	return n
}

// scaleOut is what a rendering is expected to hold.
type scaleOut struct {
	replicas     int
	bundledRedis bool // a Redis workload and Service in the rendering
	bundledS3    bool // a MinIO workload and Service in the rendering
}

// checkScaleOut checks a rendered multi-replica deployment: N mirror
// replicas that find each other through Redis, reach each other on a peer
// port that no client Service or Ingress exposes, authenticate with a
// secret taken from a Secret, share one bucket, and are ready, spread and
// protected against voluntary disruption as a cluster.
func checkScaleOut(t *testing.T, objs []object, want scaleOut) {
	t.Helper()
	const podIP = "10.1.2.3"
	for _, o := range objs {
		if o.str("kind") == "Secret" {
			t.Errorf("the rendering holds Secret %s: secrets are made by hand and only referenced", o.str("metadata", "name"))
		}
	}
	ws := workloads(objs)
	var mirrors []workload
	for _, w := range ws {
		if isMirror(w) {
			mirrors = append(mirrors, w)
		}
	}
	if len(mirrors) != 1 {
		t.Fatalf("%d mirror workloads, want 1", len(mirrors))
	}
	m := mirrors[0]
	mirrorLabels := m.labels
	if got := m.obj.get("spec", "replicas"); got != want.replicas {
		t.Errorf("mirror replicas %v, want %d", got, want.replicas)
	}
	if !selects(asMap(m.obj.get("spec", "selector", "matchLabels")), mirrorLabels) {
		t.Error("the mirror workload's selector does not select its pods")
	}
	// No other workload's pods carry the mirror's labels (a PDB, Service or
	// NetworkPolicy for the mirror would take them in).
	for _, w := range ws {
		if w.obj.str("metadata", "name") != m.obj.str("metadata", "name") && selects(mirrorLabels, w.labels) {
			t.Errorf("%s %s's pods carry the mirror pods' labels", w.obj.str("kind"), w.obj.str("metadata", "name"))
		}
	}
	c := firstContainer(m)
	ports := map[string]int{}
	for _, p := range c.list("ports") {
		po := object(asMap(p))
		ports[po.str("name")], _ = po.get("containerPort").(int)
	}
	registry, peer := ports["registry"], ports["peer"]
	if registry == 0 || peer == 0 || registry == peer {
		t.Fatalf("container ports %v: want distinct registry and peer ports", ports)
	}
	if c.str("readinessProbe", "httpGet", "path") != "/readyz" || c.str("readinessProbe", "httpGet", "port") != "registry" {
		t.Errorf("readiness probe %v: want /readyz on the registry port (it reflects membership)", c.get("readinessProbe"))
	}
	if c.str("livenessProbe", "httpGet", "path") != "/healthz" {
		t.Errorf("liveness probe %v: want /healthz", c.get("livenessProbe"))
	}

	// The environment: the advertised peer URL from the pod IP, secrets
	// from Secrets.
	env, _ := podEnv(t, c, podIP)
	for _, e := range c.list("env") {
		o := object(asMap(e))
		if slices.Contains(secretEnv, o.str("name")) && o.get("valueFrom", "secretKeyRef") == nil {
			if o.str("name") == "MIRROR_REDIS_URL" && !strings.Contains(o.str("value"), "@") {
				continue // a Redis URL without a password is no secret
			}
			t.Errorf("env %s is written into the manifest, not taken from a Secret", o.str("name"))
		}
	}
	for _, name := range []string{"MIRROR_CLUSTER_SECRET", "NGC_API_KEY"} {
		if _, ok := env[name]; !ok {
			t.Errorf("no %s in the mirror's environment", name)
		}
	}
	cfg, tree := loadPodConfig(t, objs, m, env)
	cl := clusterValues(t, cfg, tree, env)
	if want := fmt.Sprintf("http://%s:%d", podIP, peer); cl["advertise"] != want {
		t.Errorf("cluster.advertise %v, want %s (the pod IP and the peer port)", cl["advertise"], want)
	}
	if l, _ := cl["listen"].(string); l == "" || portNumber(t, l) != peer {
		t.Errorf("cluster.listen %v is not the peer container port %d", cl["listen"], peer)
	}
	if s, _ := cl["secret"].(string); !strings.HasPrefix(s, "from-secret-") {
		t.Errorf("cluster.secret does not come from a Secret: %q", s)
	}
	if portNumber(t, cfg.Addr) != registry {
		t.Errorf("addr %s is not the registry container port %d", cfg.Addr, registry)
	}

	// One shared cache and one Redis.
	if cfg.Storage.Driver != "s3" || cfg.Storage.S3.Bucket == "" {
		t.Errorf("storage %s, bucket %q: replicas must share an S3 bucket", cfg.Storage.Driver, cfg.Storage.S3.Bucket)
	}
	if cfg.State.RedisURL == "" {
		t.Error("no state.redis_url: membership and leases live in Redis")
	}
	mounted := false
	for _, mo := range c.list("volumeMounts") {
		if object(asMap(mo)).str("mountPath") == cfg.Storage.DataDir {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("data_dir %s (the spool) is not a volume: the root filesystem is read-only", cfg.Storage.DataDir)
	}
	// serviceFor finds the Service a URL's host names and the workload it
	// sends that port to.
	serviceFor := func(what, rawURL string) {
		u, err := url.Parse(rawURL)
		if err != nil || u.Hostname() == "" {
			t.Errorf("%s URL %q", what, rawURL)
			return
		}
		port, _ := strconv.Atoi(u.Port())
		for _, s := range objs {
			if s.str("kind") != "Service" || s.str("metadata", "name") != strings.Split(u.Hostname(), ".")[0] {
				continue
			}
			for _, w := range ws {
				if !selects(asMap(s.get("spec", "selector")), w.labels) {
					continue
				}
				for _, p := range s.list("spec", "ports") {
					po := object(asMap(p))
					if po.get("port") == port {
						for _, cp := range firstContainer(w).list("ports") {
							cpo := object(asMap(cp))
							if cpo.str("name") == po.str("targetPort") || cpo.get("containerPort") == po.get("targetPort") {
								return
							}
						}
					}
				}
			}
		}
		t.Errorf("%s %s: no Service of the rendering sends port %d to a container port", what, rawURL, port)
	}
	if want.bundledRedis {
		serviceFor("state.redis_url", cfg.State.RedisURL)
	}
	if want.bundledS3 {
		serviceFor("storage.s3.endpoint", cfg.Storage.S3.Endpoint)
		if !cfg.Storage.S3.PathStyle {
			t.Error("MinIO needs path-style requests")
		}
	}
	for _, kind := range []struct {
		on    bool
		image string
	}{{want.bundledRedis, "redis"}, {want.bundledS3, "minio/minio"}} {
		found := false
		for _, w := range ws {
			found = found || strings.HasPrefix(firstContainer(w).str("image"), kind.image+":")
		}
		if found != kind.on {
			t.Errorf("a %s workload rendered: %v, want %v", kind.image, found, kind.on)
		}
	}

	// Services: clients reach the registry port; the peer port is only on
	// a headless Service.
	var clientSvcs []object
	peerSvc := false
	targets := func(p object, name string, number int) bool {
		return p.get("targetPort") == name || p.get("targetPort") == number || (p.get("targetPort") == nil && p.get("port") == number)
	}
	for _, s := range objs {
		if s.str("kind") != "Service" || !selects(asMap(s.get("spec", "selector")), mirrorLabels) {
			continue
		}
		headless := s.str("spec", "clusterIP") == "None"
		for _, p := range s.list("spec", "ports") {
			po := object(asMap(p))
			if targets(po, "peer", peer) {
				if !headless {
					t.Errorf("Service %s exposes the peer port to clients", s.str("metadata", "name"))
				}
				peerSvc = true
			}
		}
		if !headless {
			clientSvcs = append(clientSvcs, s)
		}
	}
	if !peerSvc {
		t.Error("no headless Service for the peer port")
	}
	if len(clientSvcs) != 1 {
		t.Fatalf("%d client Services select the mirror pods, want 1", len(clientSvcs))
	}
	client := clientSvcs[0]
	clientPorts := map[string]object{}
	for _, p := range client.list("spec", "ports") {
		po := object(asMap(p))
		clientPorts[po.str("name")] = po
	}
	if clientPorts["registry"] == nil || !targets(clientPorts["registry"], "registry", registry) {
		t.Errorf("client Service ports %v: want registry, to the registry port", client.get("spec", "ports"))
	}
	for _, o := range objs {
		switch o.str("kind") {
		case "Ingress":
			for _, r := range o.list("spec", "rules") {
				for _, p := range object(asMap(r)).list("http", "paths") {
					b := object(asMap(asMap(p)["backend"]))
					if b.str("service", "name") != client.str("metadata", "name") || b.str("service", "port", "name") != "registry" {
						t.Errorf("Ingress backend %v: want the client Service's registry port", b)
					}
				}
			}
		case "ServiceMonitor":
			if !selects(asMap(o.get("spec", "selector", "matchLabels")), asMap(client.get("metadata", "labels"))) {
				t.Error("the ServiceMonitor does not select the client Service")
			}
			for _, ep := range o.list("spec", "endpoints") {
				e := object(asMap(ep))
				if clientPorts[e.str("port")] == nil || e.str("path") != "/metrics" {
					t.Errorf("ServiceMonitor endpoint %v does not match the client Service", e)
				}
			}
			for _, s := range objs {
				if s.str("kind") == "Service" && s.str("spec", "clusterIP") == "None" && selects(asMap(o.get("spec", "selector", "matchLabels")), asMap(s.get("metadata", "labels"))) {
					t.Errorf("the ServiceMonitor also selects the peer Service %s (each replica scraped twice)", s.str("metadata", "name"))
				}
			}
		case "DaemonSet":
			var script string
			for _, ic := range object(asMap(o.get("spec", "template", "spec"))).list("initContainers") {
				for _, s := range object(asMap(ic)).list("command") {
					script += fmt.Sprint(s) + "\n"
				}
			}
			if np := clientPorts["registry"].get("nodePort"); np == nil || !strings.Contains(script, fmt.Sprintf(":%v\"]", np)) {
				t.Errorf("the containerd hosts.toml does not point at the client Service's node port %v", np)
			}
		}
	}

	// Disruption budget, spreading, network policy.
	pdbs := 0
	for _, o := range objs {
		if o.str("kind") != "PodDisruptionBudget" {
			continue
		}
		sel := asMap(o.get("spec", "selector", "matchLabels"))
		if !selects(sel, mirrorLabels) {
			continue
		}
		pdbs++
		for _, w := range ws {
			if !isMirror(w) && selects(sel, w.labels) {
				t.Errorf("the PodDisruptionBudget also selects %s %s", w.obj.str("kind"), w.obj.str("metadata", "name"))
			}
		}
		maxU, hasMax := o.get("spec", "maxUnavailable").(int)
		minA, hasMin := o.get("spec", "minAvailable").(int)
		if hasMax == hasMin || (hasMax && maxU < 1) || (hasMin && (minA < 1 || minA >= want.replicas)) {
			t.Errorf("PodDisruptionBudget %v: want a budget that keeps replicas serving and still lets a node drain", o.get("spec"))
		}
	}
	if pdbs != 1 {
		t.Errorf("%d PodDisruptionBudgets select the mirror pods, want 1", pdbs)
	}
	anti := object(asMap(m.spec.get("affinity", "podAntiAffinity")))
	var terms []object
	for _, tm := range anti.list("requiredDuringSchedulingIgnoredDuringExecution") {
		terms = append(terms, object(asMap(tm)))
	}
	for _, tm := range anti.list("preferredDuringSchedulingIgnoredDuringExecution") {
		terms = append(terms, object(asMap(asMap(tm)["podAffinityTerm"])))
	}
	spread := false
	for _, tm := range terms {
		spread = spread || (tm.str("topologyKey") == "kubernetes.io/hostname" && selects(asMap(tm.get("labelSelector", "matchLabels")), mirrorLabels))
	}
	if !spread {
		t.Errorf("no pod anti-affinity spreading the replicas over nodes: %v", anti)
	}
	for _, o := range objs {
		if o.str("kind") != "NetworkPolicy" || !selects(asMap(o.get("spec", "podSelector", "matchLabels")), mirrorLabels) {
			continue
		}
		registryOpen := false
		for _, r := range o.list("spec", "ingress") {
			ro := object(asMap(r))
			for _, p := range ro.list("ports") {
				port := asMap(p)["port"]
				if port == "registry" || port == registry {
					registryOpen = registryOpen || len(ro.list("from")) == 0
				}
				if port != "peer" && port != peer {
					continue
				}
				if len(ro.list("from")) == 0 {
					t.Error("the NetworkPolicy opens the peer port to everyone")
				}
				for _, f := range ro.list("from") {
					fo := object(asMap(f))
					if fo.get("ipBlock") != nil || fo.get("namespaceSelector") != nil || !selects(asMap(fo.get("podSelector", "matchLabels")), mirrorLabels) {
						t.Errorf("the NetworkPolicy opens the peer port to %v, not only to mirror pods", f)
					}
				}
			}
		}
		if !registryOpen {
			t.Error("the NetworkPolicy does not let clients reach the registry port")
		}
	}
}

// TestHelmChart lints the chart and renders it the way a lab (bundled
// Redis and MinIO) and a production cluster (external Redis and bucket,
// ingress, hard anti-affinity) would install it.
func TestHelmChart(t *testing.T) {
	t.Parallel()
	need(t, "helm")
	if out, err := exec.Command("helm", "lint", "--strict", "helm/ngc-mirror").CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		name string
		sets []string
		want scaleOut
		// check runs on top of checkScaleOut.
		check func(t *testing.T, objs []object)
	}{
		{name: "lab defaults", want: scaleOut{replicas: 3, bundledRedis: true, bundledS3: true}},
		{name: "one replica", sets: []string{"replicas=1"}, want: scaleOut{replicas: 1, bundledRedis: true, bundledS3: true}},
		{name: "external redis and bucket", sets: []string{
			"replicas=8", "redis.enabled=false", "redis.urlSecret=lab-redis", "minio.enabled=false",
			"s3.endpoint=https://s3.lab:9000", "s3.bucket=lab-cache", "s3.pathStyle=true", "s3.credentialsSecret=",
			"antiAffinity=hard", "ingress.enabled=true", "serviceMonitor.enabled=true", "admin.tokenSecret=lab-admin",
			"containerdHosts.enabled=false", "service.type=ClusterIP", "cluster.port=7946",
		}, want: scaleOut{replicas: 8}, check: func(t *testing.T, objs []object) {
			var kinds []string
			for _, o := range objs {
				kinds = append(kinds, o.str("kind"))
			}
			for _, k := range []string{"Ingress", "ServiceMonitor"} {
				if !slices.Contains(kinds, k) {
					t.Errorf("no %s rendered", k)
				}
			}
			if slices.Contains(kinds, "PersistentVolumeClaim") || slices.Contains(kinds, "StatefulSet") || slices.Contains(kinds, "DaemonSet") {
				t.Errorf("external Redis and bucket, no containerd hosts: rendered %v", kinds)
			}
			for _, w := range workloads(objs) {
				if isMirror(w) {
					if w.spec.get("affinity", "podAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution") == nil {
						t.Error("antiAffinity=hard renders no required anti-affinity")
					}
					env, _ := podEnv(t, firstContainer(w), "10.0.0.1")
					if _, ok := env["MIRROR_S3_SECRET_KEY"]; ok {
						t.Error("s3.credentialsSecret empty (the AWS chain) still sets MIRROR_S3_SECRET_KEY")
					}
					if _, ok := env["MIRROR_ADMIN_TOKEN"]; !ok {
						t.Error("admin.tokenSecret set, no MIRROR_ADMIN_TOKEN")
					}
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, stderr, err := helmTemplate(t, tc.sets...)
			if err != nil {
				t.Fatalf("helm template: %v\n%s", err, stderr)
			}
			checkScaleOut(t, objs, tc.want)
			if tc.check != nil {
				tc.check(t, objs)
			}
		})
	}
}

// TestHelmChartRefuses: values that cannot make a working cluster fail the
// rendering with a message naming the value, rather than installing
// replicas that each fill alone.
func TestHelmChartRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		sets []string
		want string
	}{
		{[]string{"redis.enabled=false"}, "redis.url or redis.urlSecret"},
		{[]string{"s3.bucket="}, "s3.bucket is required"},
		{[]string{"s3.credentialsSecret="}, "minio.enabled needs s3.credentialsSecret"},
		{[]string{"cluster.secretName="}, "cluster.secretName"},
		{[]string{"cluster.port=5000"}, "cluster.port must differ"},
		{[]string{"config.storage.driver=filesystem"}, "config.storage is set by the chart"},
		{[]string{"service.type=LoadBalancer"}, "containerdHosts.enabled needs service.type NodePort"},
		{[]string{"antiAffinity=sometimes"}, "antiAffinity: soft or hard"},
	} {
		_, stderr, err := helmTemplate(t, tc.sets...)
		if err == nil || !strings.Contains(string(stderr), tc.want) {
			t.Errorf("--set %v: err %v, stderr %q; want a failure saying %q", tc.sets, err, stderr, tc.want)
		}
	}
}

// TestHelmConfigChangeRollsReplicas: the pod template carries a checksum of
// the ConfigMap (whose name is fixed), so a changed configuration rolls the
// replicas, and an unchanged one does not.
func TestHelmConfigChangeRollsReplicas(t *testing.T) {
	t.Parallel()
	checksum := func(sets ...string) string {
		objs, stderr, err := helmTemplate(t, sets...)
		if err != nil {
			t.Fatalf("helm template: %v\n%s", err, stderr)
		}
		for _, w := range workloads(objs) {
			if isMirror(w) {
				return w.obj.str("spec", "template", "metadata", "annotations", "checksum/config")
			}
		}
		t.Fatal("no mirror workload")
		return ""
	}
	a, b, c := checksum(), checksum(), checksum("config.log_level=debug")
	if a == "" || a != b {
		t.Errorf("checksum %q then %q for the same values", a, b)
	}
	if a == c {
		t.Error("the checksum did not change with the configuration: the replicas would keep the old one")
	}
}

// clusterMetrics are the scale-out metrics (#11) the Replicas row and the
// cluster alerts are built on.
var clusterMetrics = []string{"ngc_mirror_cluster_members", "ngc_mirror_cluster_coordinated",
	"ngc_mirror_peer_blobs_total", "ngc_mirror_peer_bytes_total", "ngc_mirror_fills_owned_total"}

// registeredMetrics returns the metric names the mirror's source registers:
// the "ngc_mirror_..." string literals of its non-test Go files.
func registeredMetrics(t *testing.T) map[string]bool {
	t.Helper()
	lit := regexp.MustCompile(`"(ngc_mirror_[a-z0-9_]+)"`)
	names := map[string]bool{}
	for _, root := range []string{"../internal", "../cmd"} {
		err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return err
			}
			src, err := os.ReadFile(p)
			for _, m := range lit.FindAllSubmatch(src, -1) {
				names[string(m[1])] = true
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(names) < 20 {
		t.Fatalf("found only %d metric names in the source: %v", len(names), names)
	}
	return names
}

// grafanaVars replaces the dashboard's Grafana variables so that the
// expression is PromQL.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "5m", `"$job"`, `".*"`)

// TestDashboardAndRulesUseKnownMetrics: every expression of the dashboard
// and the alert rules parses (promtool) and names only metrics the mirror
// registers, so a renamed metric cannot leave a panel or an alert silently
// empty; and the Replicas row shows the scale-out metrics.
func TestDashboardAndRulesUseKnownMetrics(t *testing.T) {
	t.Parallel()
	known := registeredMetrics(t)
	for _, n := range clusterMetrics {
		if !known[n] && clusterInConfig() {
			t.Errorf("clustering is in config, but no source registers %s", n)
		}
		if !clusterInConfig() {
			known[n] = true // pending the cluster core (#11)
		}
	}
	var dash struct {
		Panels []struct {
			Type    string             `json:"type"`
			Title   string             `json:"title"`
			GridPos struct{ X, Y int } `json:"gridPos"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Query string `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	decodeFile(t, "grafana/ngc-mirror.json", &dash)
	type expr struct{ where, promql string }
	var exprs []expr
	rowY := -1
	var replicaExprs string
	for _, p := range dash.Panels {
		if p.Type == "row" && p.Title == "Replicas" {
			rowY = p.GridPos.Y
		}
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, expr{"panel " + p.Title, grafanaVars.Replace(tg.Expr)})
			if rowY >= 0 && p.GridPos.Y > rowY {
				replicaExprs += tg.Expr + "\n"
			}
		}
	}
	if rowY < 0 {
		t.Error(`the dashboard has no "Replicas" row`)
	}
	for _, n := range clusterMetrics {
		if !strings.Contains(replicaExprs, n) {
			t.Errorf("the Replicas row does not show %s", n)
		}
	}
	if !strings.Contains(replicaExprs, `result="error"`) {
		t.Error("the Replicas row does not show peer errors")
	}
	for _, v := range dash.Templating.List {
		if m := regexp.MustCompile(`label_values\((\w+),`).FindStringSubmatch(v.Query); m != nil {
			exprs = append(exprs, expr{"variable", m[1]})
		}
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
				For   string `yaml:"for"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	decodeFile(t, "prometheus/alerts.yml", &rules)
	alerts := map[string]string{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, expr{"alert " + r.Alert, r.Expr})
			alerts[r.Alert] = r.Expr
		}
	}
	if !strings.Contains(alerts["NGCMirrorNotCoordinated"], "ngc_mirror_cluster_coordinated == 0") {
		t.Errorf("NGCMirrorNotCoordinated: %q", alerts["NGCMirrorNotCoordinated"])
	}

	// Metric names.
	ident := regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	for _, e := range exprs {
		for _, id := range ident.FindAllString(e.promql, -1) {
			if !strings.HasPrefix(id, "ngc_mirror_") {
				continue
			}
			base := id
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if b, ok := strings.CutSuffix(id, suf); ok && known[b] {
					base = b
				}
			}
			if !known[base] {
				t.Errorf("%s uses %s, which the mirror does not register", e.where, id)
			}
		}
	}
	// Syntax: the dashboard's expressions as recording rules, checked by
	// promtool (the alert rules are checked as they are).
	need(t, "promtool")
	var rf strings.Builder
	rf.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, e := range exprs {
		fmt.Fprintf(&rf, "      - record: dashboard:expr_%d\n        expr: %q\n", i, e.promql)
	}
	path := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(path, []byte(rf.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{path, "prometheus/alerts.yml"} {
		if out, err := exec.Command("promtool", "check", "rules", f).CombinedOutput(); err != nil {
			t.Errorf("promtool check rules %s: %v\n%s", f, err, out)
		}
	}
}

// TestAlertRules runs the alert rules' unit tests (prometheus/alerts_test.yml)
// with promtool: the scale-out alerts fire on a replica filling alone or
// missing from the membership, and on failing peer streams, and not on a
// healthy cluster or a single mirror.
func TestAlertRules(t *testing.T) {
	t.Parallel()
	need(t, "promtool")
	out, err := exec.Command("promtool", "test", "rules", "prometheus/alerts_test.yml").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SUCCESS") {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
}

// composeService is the part of a resolved compose service the checks read.
type composeService struct {
	Image       string            `yaml:"image"`
	Profiles    []string          `yaml:"profiles"`
	Environment map[string]string `yaml:"environment"`
	Ports       []any             `yaml:"ports"`
	Volumes     []any             `yaml:"volumes"`
	DependsOn   any               `yaml:"depends_on"`
	Networks    map[string]struct {
		IPv4Address string `yaml:"ipv4_address"`
	} `yaml:"networks"`
}

// mounts returns a service's bind mounts, target → source, in the short
// (docker-compose 1) and long (compose 2) forms.
func (s composeService) mounts() map[string]string {
	m := map[string]string{}
	for _, v := range s.Volumes {
		switch v := v.(type) {
		case string:
			parts := strings.Split(v, ":")
			if len(parts) >= 2 {
				m[parts[1]] = parts[0]
			}
		case map[string]any:
			m[fmt.Sprint(v["target"])] = fmt.Sprint(v["source"])
		}
	}
	return m
}

// TestComposeScaleOut resolves docker-compose.yml's "scale-out" profile with
// the real docker-compose and checks it: two or more replicas of the mirror
// image whose environment config.Load reads into one clustered cache (same
// Redis and bucket, each advertising its own peer listener), no replica
// published on the host, HAProxy (its configuration checked by the real
// haproxy) in front of their registry ports only, Prometheus scraping each
// replica, and the default profile unchanged.
func TestComposeScaleOut(t *testing.T) {
	t.Parallel()
	need(t, "docker-compose")
	var file struct {
		Services map[string]composeService `yaml:"services"`
	}
	decodeFile(t, "../docker-compose.yml", &file)
	var always []string
	for name, s := range file.Services {
		if len(s.Profiles) == 0 {
			always = append(always, name)
		}
	}
	slices.Sort(always)
	if want := []string{"grafana", "mirror", "prometheus", "redis"}; !slices.Equal(always, want) {
		t.Errorf("services without a profile %v, want %v: a bare `docker compose up` must run what it did", always, want)
	}

	cmd := exec.Command("docker-compose", "--profile", "scale-out", "config")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "MIRROR_PROMETHEUS_CONFIG=prometheus-scale-out.yml",
		"MIRROR_CLUSTER_SECRET=test-cluster-secret-0123456789", "MIRROR_S3_SECRET_KEY=test-s3-secret")
	out, stderr, err := output(t, cmd)
	if err != nil {
		t.Fatalf("docker-compose --profile scale-out config: %v\n%s", err, stderr)
	}
	var resolved struct {
		Services map[string]composeService `yaml:"services"`
	}
	if err := yaml.Unmarshal(out, &resolved); err != nil {
		t.Fatal(err)
	}
	svcs := resolved.Services
	var replicas []string
	for name, s := range svcs {
		if s.Image == svcs["mirror"].Image && slices.Contains(s.Profiles, "scale-out") {
			replicas = append(replicas, name)
		}
	}
	slices.Sort(replicas)
	if len(replicas) < 2 {
		t.Fatalf("scale-out replicas %v: want at least 2", replicas)
	}
	var first config.Config
	for i, name := range replicas {
		s := svcs[name]
		if len(s.Ports) != 0 {
			t.Errorf("replica %s publishes %v on the host: clients go through the balancer, peers stay on the compose network", name, s.Ports)
		}
		// The image's configuration file and environment (Dockerfile), then
		// the service's.
		env := map[string]string{"MIRROR_DATA_DIR": "/data"}
		for k, v := range s.Environment {
			if v != "" {
				env[k] = v
			}
		}
		cfg := checkLoad(t, "../configs/mirror.yaml", env, "MIRROR_DATA_DIR")
		var adv string
		if clusterInConfig() {
			cl := clusterValues(t, cfg, nil, env)
			adv, _ = cl["advertise"].(string)
		} else {
			adv = env["MIRROR_CLUSTER_ADVERTISE"]
		}
		if want := "http://" + name + ":5002"; adv != want {
			t.Errorf("replica %s advertises %q, want %s (its own name, the peer listener)", name, adv, want)
		}
		// X-Forwarded-For is trusted from the balancer's own address only:
		// a private range would hold the lab's nodes too, which could then
		// choose their address.
		if lb := svcs["mirror-lb"].Networks["default"].IPv4Address; lb == "" || !slices.Equal(cfg.Server.TrustedProxies, []string{lb}) {
			t.Errorf("replica %s trusts %v for X-Forwarded-For, want mirror-lb's fixed address %q alone", name, cfg.Server.TrustedProxies, lb)
		}
		if env["MIRROR_CLUSTER_SECRET"] != "test-cluster-secret-0123456789" {
			t.Errorf("replica %s does not take the cluster secret from MIRROR_CLUSTER_SECRET", name)
		}
		if cfg.Storage.Driver != "s3" || cfg.State.RedisURL == "" {
			t.Errorf("replica %s: storage %s, redis %q: want the shared bucket and Redis", name, cfg.Storage.Driver, cfg.State.RedisURL)
		}
		for what, rawURL := range map[string]string{"redis": cfg.State.RedisURL, "s3 endpoint": cfg.Storage.S3.Endpoint} {
			u, err := url.Parse(rawURL)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := svcs[u.Hostname()]; !ok {
				t.Errorf("replica %s: %s %s is no service of the profile", name, what, rawURL)
			}
		}
		if i == 0 {
			first = cfg
			continue
		}
		if cfg.State.RedisURL != first.State.RedisURL || cfg.Storage.S3 != first.Storage.S3 {
			t.Errorf("replicas %s and %s do not share Redis and the bucket", replicas[0], name)
		}
	}

	// The balancer: HAProxy's configuration names each replica's registry
	// port, never a peer port, and the real haproxy accepts it.
	var lb string
	for name, s := range svcs {
		if strings.HasPrefix(s.Image, "haproxy:") {
			lb = name
		}
	}
	if lb == "" {
		t.Fatal("no HAProxy service in the scale-out profile")
	}
	if !slices.Contains(svcs[lb].Profiles, "scale-out") {
		t.Errorf("%s is not in the scale-out profile only", lb)
	}
	published := false
	for _, p := range svcs[lb].Ports {
		switch p := p.(type) {
		case map[string]any:
			published = published || (fmt.Sprint(p["published"]) == "5000" && fmt.Sprint(p["target"]) == "5000")
		case string:
			published = published || p == "5000:5000"
		}
	}
	if !published {
		t.Errorf("%s ports %v: want 5000 on the host, where nodes pull from", lb, svcs[lb].Ports)
	}
	cfgFile := svcs[lb].mounts()["/usr/local/etc/haproxy/haproxy.cfg"]
	haCfg, err := os.ReadFile(cfgFile)
	if err != nil {
		t.Fatalf("HAProxy configuration %q: %v", cfgFile, err)
	}
	var servers []string
	for _, l := range strings.Split(string(haCfg), "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[0] == "server" {
			servers = append(servers, f[2])
		}
	}
	slices.Sort(servers)
	var wantServers []string
	for _, r := range replicas {
		wantServers = append(wantServers, r+":5000")
	}
	if !slices.Equal(servers, wantServers) {
		t.Errorf("HAProxy servers %v, want each replica's registry port %v", servers, wantServers)
	}
	if !strings.Contains(string(haCfg), "option httpchk GET /readyz") {
		t.Error("HAProxy does not take replicas out of rotation on /readyz")
	}
	need(t, "haproxy")
	if out, err := exec.Command("haproxy", "-c", "-f", cfgFile).CombinedOutput(); err != nil {
		t.Errorf("haproxy -c: %v\n%s", err, out)
	}

	// Prometheus scrapes each replica directly.
	promFile := svcs["prometheus"].mounts()["/etc/prometheus/prometheus.yml"]
	var prom struct {
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	decodeFile(t, promFile, &prom)
	var targets []string
	for _, sc := range prom.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			if sc.JobName == "ngc-mirror" {
				targets = append(targets, st.Targets...)
			}
		}
	}
	slices.Sort(targets)
	if !slices.Equal(targets, wantServers) {
		t.Errorf("Prometheus (%s) scrapes %v, want each replica %v", filepath.Base(promFile), targets, wantServers)
	}
	for _, s := range []string{"minio", "minio-bucket"} {
		if _, ok := svcs[s]; !ok {
			t.Errorf("the scale-out profile has no %s", s)
		}
	}
}

// TestKustomizeScaleOut renders deploy/kubernetes-scale-out (the base as
// replicas sharing a bundled Redis and an external bucket) with the real
// kustomize and checks it as the Helm chart is checked.
func TestKustomizeScaleOut(t *testing.T) {
	t.Parallel()
	objs := decodeObjects(t, kustomize(t, "kubernetes-scale-out"))
	checkScaleOut(t, objs, scaleOut{replicas: 3, bundledRedis: true})
	for _, w := range workloads(objs) {
		if !isMirror(w) {
			continue
		}
		if w.obj.get("spec", "volumeClaimTemplates") != nil {
			t.Error("the replicas still claim a volume each: the cache is the bucket")
		}
		for _, v := range w.spec.list("volumes") {
			if o := object(asMap(v)); o.str("name") == "config" && !strings.HasPrefix(o.str("configMap", "name"), "ngc-mirror-config-") {
				t.Errorf("config volume %q is not the generated, hash-suffixed ConfigMap (no rollout on change)", o.str("configMap", "name"))
			}
		}
	}
}

// TestHelmChartIPv6: with cluster.ipv6 the advertise URL holds the pod's
// IPv6 address in brackets, which the peers can dial (without them,
// http://fd00::1:5002 is no URL, and config.Load refuses it).
func TestHelmChartIPv6(t *testing.T) {
	t.Parallel()
	objs, stderr, err := helmTemplate(t, "cluster.ipv6=true")
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr)
	}
	found := false
	for _, w := range workloads(objs) {
		if !isMirror(w) {
			continue
		}
		found = true
		env, _ := podEnv(t, firstContainer(w), "fd00::1")
		adv := env["MIRROR_CLUSTER_ADVERTISE"]
		u, err := url.Parse(adv)
		if err != nil || u.Hostname() != "fd00::1" || u.Port() != "5002" {
			t.Fatalf("advertise %q with an IPv6 pod address: host %q port %q, %v", adv, u.Hostname(), u.Port(), err)
		}
		if host, _, err := net.SplitHostPort(u.Host); err != nil || host != "fd00::1" {
			t.Errorf("advertise %q: the dialer's host:port %q splits into %q, %v", adv, u.Host, host, err)
		}
	}
	if !found {
		t.Fatal("no mirror workload")
	}
}
