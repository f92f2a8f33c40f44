package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"
)

// Cluster makes replicas that share Redis (state.redis_url) and, for one
// cache, an S3 bucket act as one cache: one upstream fetch per blob across
// them, the bytes streamed from the replica that fetches to the others
// (see internal/cluster and README, "Scale-out").
type Cluster struct {
	// Advertise is the URL peers reach this replica's peer listener at
	// (http://10.0.0.5:5002). Empty: no clustering, one process as before.
	Advertise string `yaml:"advertise"`
	// Listen is the peer listener's address, apart from addr (peers only,
	// never behind the client load balancer). Default ":5002".
	Listen string `yaml:"listen"`
	// Secret authenticates peer requests (HMAC-SHA256); required with
	// Advertise, at least 16 characters. A secret: prefer
	// MIRROR_CLUSTER_SECRET or SecretFile.
	Secret     string `yaml:"secret"`
	SecretFile string `yaml:"secret_file"`
	// secretErr is why SecretFile could not be read: an error of
	// ValidateSecret (serve's), not of Load, so that operator commands
	// on a host without the file still run.
	secretErr error
	// Heartbeat is how often membership and ownership leases are renewed
	// in Redis; a replica is dropped after 3 missed heartbeats. Default 2s.
	Heartbeat Duration `yaml:"heartbeat"`
}

// MinClusterSecret is the shortest cluster.secret accepted, in bytes.
const MinClusterSecret = 16

func defaultCluster() Cluster {
	return Cluster{Listen: ":5002", Heartbeat: Duration(2 * time.Second)}
}

// Enabled reports whether clustering is on (Advertise is set).
func (c Cluster) Enabled() bool { return c.Advertise != "" }

// loadClusterEnv applies MIRROR_CLUSTER_ADVERTISE, MIRROR_CLUSTER_LISTEN
// and MIRROR_CLUSTER_SECRET, then reads SecretFile when no secret is set
// (a failure is kept for ValidateSecret).
func (c *Config) loadClusterEnv(getenv func(string) string) {
	for env, dst := range map[string]*string{
		"MIRROR_CLUSTER_ADVERTISE": &c.Cluster.Advertise,
		"MIRROR_CLUSTER_LISTEN":    &c.Cluster.Listen,
		"MIRROR_CLUSTER_SECRET":    &c.Cluster.Secret,
	} {
		if v := getenv(env); v != "" {
			*dst = v
		}
	}
	if c.Cluster.Secret == "" && c.Cluster.SecretFile != "" {
		raw, err := os.ReadFile(c.Cluster.SecretFile)
		if err != nil {
			c.Cluster.secretErr = fmt.Errorf("config: cluster.secret_file: %w", err)
			return
		}
		c.Cluster.Secret = strings.TrimSpace(string(raw))
	}
}

// ValidateSecret checks the cluster secret, which only the peer protocol
// (serve with cluster.advertise) uses: readable from cluster.secret_file
// and at least MinClusterSecret characters. Load does not check it, so
// that the operator commands (fsck, gc, jobs, tags, ...) run with a
// replica's config whose secret is in serve's environment alone
// (MIRROR_CLUSTER_SECRET). The error never shows the secret.
func (c Config) ValidateSecret() error {
	cl := c.Cluster
	switch {
	case !cl.Enabled():
		return nil
	case cl.secretErr != nil:
		return cl.secretErr
	case len(cl.Secret) < MinClusterSecret:
		return fmt.Errorf("config: cluster.secret (MIRROR_CLUSTER_SECRET or cluster.secret_file) of at least %d characters is required with cluster.advertise", MinClusterSecret)
	}
	return nil
}

func (c Config) validateCluster() []error {
	cl := c.Cluster
	if !cl.Enabled() {
		return nil
	}
	var errs []error
	if u, err := url.Parse(cl.Advertise); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		// An IPv6 address without brackets (http://$(POD_IP):5002 in an
		// IPv6 cluster) fails url.Parse: say how to write one.
		errs = append(errs, errors.New("cluster.advertise (MIRROR_CLUSTER_ADVERTISE): want http(s)://host:port of this replica's peer listener (an IPv6 address in brackets: http://[fd00::5]:5002)"))
	}
	if _, _, err := net.SplitHostPort(cl.Listen); err != nil {
		errs = append(errs, errors.New("cluster.listen (MIRROR_CLUSTER_LISTEN): want host:port or :port"))
	} else if cl.Listen == c.Addr {
		errs = append(errs, errors.New("cluster.listen must differ from addr: the peer endpoint has a listener of its own"))
	}
	if c.State.RedisURL == "" {
		errs = append(errs, errors.New("cluster.advertise needs state.redis_url (MIRROR_REDIS_URL): membership and blob leases live in Redis"))
	}
	if cl.Heartbeat < Duration(100*time.Millisecond) {
		errs = append(errs, errors.New("cluster.heartbeat: at least 100ms"))
	}
	return errs
}
