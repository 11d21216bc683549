package main

import (
	"fmt"
	"net/url"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// startEtcd starts a single-member embedded etcd on an ephemeral loopback
// port and returns it together with its client URL.
func startEtcd(dataDir string, logLevel string) (*embed.Etcd, string, error) {
	cfg := embed.NewConfig()
	cfg.Name = "testcluster"
	cfg.Dir = filepath.Join(dataDir, "etcd")
	// Listening on port 0 lets the kernel pick free ports, so several clusters
	// never race for the same port. The advertised peer URL is never dialled
	// in a one-member cluster; it only has to be self-consistent.
	client := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	peer := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	advPeer := url.URL{Scheme: "http", Host: "127.0.0.1:2380"}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{advPeer}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, advPeer.String())
	cfg.ListenMetricsUrls = nil
	cfg.LogLevel = logLevel
	cfg.LogOutputs = []string{"stderr"}
	// Small footprint, fast writes: this is a throw-away test store.
	cfg.UnsafeNoFsync = true
	cfg.SnapshotCount = 5000
	cfg.SnapshotCatchUpEntries = 1000
	cfg.QuotaBackendBytes = 1 << 30
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	cfg.EnableGRPCGateway = false

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("starting etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, "", fmt.Errorf("etcd failed: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", fmt.Errorf("etcd did not become ready within 60s")
	}
	if len(e.Clients) == 0 {
		e.Close()
		return nil, "", fmt.Errorf("etcd has no client listener")
	}
	return e, "http://" + e.Clients[0].Addr().String(), nil
}
