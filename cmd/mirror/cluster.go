package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/ngc-mirror/ngc-mirror/internal/cluster"
	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/metrics"
	"github.com/ngc-mirror/ngc-mirror/internal/pull"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// scaleOut is a replica's part in a cluster (cluster.advertise): its
// membership and leases, and the peer endpoint on its own listener.
type scaleOut struct {
	node *cluster.Node
	ln   net.Listener
	m    *metrics.Cluster
	log  *slog.Logger
	stop context.CancelFunc // ends membership once fills are done
	ctx  context.Context
}

// newScaleOut joins the cluster (one heartbeat) and listens for peers; nil
// without clustering.
func newScaleOut(ctx context.Context, cfg config.Config, store *storage.Store, reg prometheus.Registerer, log *slog.Logger) (*scaleOut, error) {
	if !cfg.Cluster.Enabled() {
		return nil, nil
	}
	log = log.With("component", "cluster")
	m := metrics.NewCluster(reg)
	node, err := cluster.New(cluster.Options{
		RedisURL:  cfg.State.RedisURL,
		Prefix:    cfg.State.RedisPrefix,
		Advertise: cfg.Cluster.Advertise,
		Secret:    []byte(cfg.Cluster.Secret),
		Heartbeat: time.Duration(cfg.Cluster.Heartbeat),
		Timeout:   time.Duration(cfg.State.Timeout),
		Store:     store,
		Metrics:   m,
		Log:       log,
	})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Cluster.Listen)
	if err != nil {
		_ = node.Close()
		return nil, errors.New(listenError(cfg.Cluster.Listen, err).Error() + " (the peer listener: cluster.listen, MIRROR_CLUSTER_LISTEN)")
	}
	node.Join(ctx)
	nctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	log.Info("cluster: peer endpoint listening", "listen", ln.Addr().String(), "advertise", cfg.Cluster.Advertise, "status", node.Status())
	return &scaleOut{node: node, ln: ln, m: m, log: log, stop: stop, ctx: nctx}, nil
}

// cluster returns what pull.Options.Cluster takes (nil without clustering).
func (s *scaleOut) cluster() pull.Cluster {
	if s == nil {
		return nil
	}
	return s.node
}

// ready is the health.Checker's Cluster hook (nil without clustering).
func (s *scaleOut) ready() func() (string, bool) {
	if s == nil {
		return nil
	}
	return func() (string, bool) { return s.node.Status(), s.node.Ready() }
}

// run heart-beats and serves peers until end is called (after the fills
// of a shutdown are done: peers may still be streaming from them), then
// deregisters.
func (s *scaleOut) run(g *errgroup.Group, svc *pull.Service, secret string) {
	if s == nil {
		return
	}
	srv := &http.Server{
		Handler:           cluster.NewServer([]byte(secret), svc, s.m, s.log),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	g.Go(func() error {
		errc := make(chan error, 1)
		go func() { errc <- srv.Serve(s.ln) }()
		select {
		case err := <-errc:
			return err
		case <-s.ctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			_ = srv.Close()
		}
		<-errc
		return nil
	})
	g.Go(func() error {
		s.node.Run(s.ctx)
		return s.node.Close()
	})
}

// end stops membership and the peer endpoint.
func (s *scaleOut) end() {
	if s != nil {
		s.stop()
	}
}
