// Command kube-testcluster runs a complete, small Kubernetes control plane in
// one process for tests: embedded etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler and a simulator for a couple of nodes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/version"
	"k8s.io/klog/v2"
)

const (
	serviceCIDR  = "10.96.0.0/16"
	serviceAPIIP = "10.96.0.1"
)

// kubeVersion is what simulated kubelets report; the build stamps the real
// version into component-base, this is the fallback.
var kubeVersion = "v1.34.4"

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kube-testcluster: "+format+"\n", args...)
}

func main() {
	os.Exit(run())
}

func run() int {
	fs := flag.NewFlagSet("kube-testcluster", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "directory for certificates, kubeconfig and etcd data (required)")
	port := fs.Int("port", 6443, "HTTPS port of kube-apiserver on 127.0.0.1")
	nodes := fs.Int("nodes", 2, "number of simulated nodes")
	nodePrefix := fs.String("node-prefix", "sim-node-", "name prefix of the simulated nodes")
	name := fs.String("name", "kube-testcluster", "cluster/context name in the kubeconfig")
	verbosity := fs.Int("v", 0, "log verbosity of the Kubernetes components")
	logFile := fs.String("log-file", "", "write all logs (stderr) to this file instead")
	memLimit := fs.Int64("memory-limit-mb", 400, "Go soft memory limit in MiB (0: none; GOMEMLIMIT wins)")
	extraAPI := fs.String("apiserver-args", "", "extra kube-apiserver flags, space separated")
	extraCM := fs.String("controller-manager-args", "", "extra kube-controller-manager flags, space separated")
	watchPID := fs.Int("watch-pid", 0, "shut down when the process with this PID is gone (e.g. the test runner)")
	stdinEOF := fs.Bool("stop-on-stdin-eof", false, "shut down when stdin is closed (hand it a pipe that the test runner holds)")
	showVersion := fs.Bool("version", false, "print the Kubernetes version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if v := version.Get().GitVersion; len(v) > 1 && v[:2] == "v1" {
		kubeVersion = v
	}
	if *showVersion {
		fmt.Println(kubeVersion)
		return 0
	}
	if *dataDir == "" {
		logf("--data-dir is required")
		return 2
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		logf("%v", err)
		return 1
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		logf("%v", err)
		return 1
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		logf("%v", err)
		return 1
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		logf("data dir %s is in use by another kube-testcluster (%v)", dir, err)
		return 1
	}
	if *logFile != "" {
		f, err := os.OpenFile(*logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			logf("%v", err)
			return 1
		}
		if err := unix.Dup2(int(f.Fd()), 2); err != nil {
			logf("redirecting stderr: %v", err)
			return 1
		}
	}
	// Trade a little CPU for ~20% less memory (GOGC in the environment wins).
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(50)
	}
	if os.Getenv("GOMEMLIMIT") == "" && *memLimit > 0 {
		debug.SetMemoryLimit(*memLimit << 20)
	}

	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("v", strconv.Itoa(*verbosity))
	_ = klogFlags.Set("logtostderr", "true")

	start := time.Now()
	sigCh := make(chan os.Signal, 2)
	signal.Notify(sigCh, syscall.SIGTERM, syscall.SIGINT)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	// Components call klog.Fatal when their startup is interrupted; once we
	// are shutting down, park such goroutines instead of exiting non-zero in
	// the middle of the orderly shutdown.
	var shuttingDown atomic.Bool
	var parkOnce sync.Once
	klog.OsExit = func(code int) {
		if shuttingDown.Load() {
			parkOnce.Do(func() { close(parked) })
			select {}
		}
		os.Exit(code)
	}
	go func() {
		s := <-sigCh
		shuttingDown.Store(true)
		logf("received %v, shutting down", s)
		stop()
		// a second signal, or a hung shutdown, ends the process at once
		select {
		case <-sigCh:
			logf("second signal, exiting now")
			klog.Flush()
			os.Exit(1)
		case <-time.After(8 * time.Second):
			logf("shutdown took too long, exiting now")
			klog.Flush()
			os.Exit(0)
		}
	}()

	if *watchPID > 0 {
		go func() {
			for {
				time.Sleep(500 * time.Millisecond)
				if err := unix.Kill(*watchPID, 0); errors.Is(err, unix.ESRCH) {
					logf("watched process %d is gone", *watchPID)
					sigCh <- syscall.SIGTERM
					return
				}
			}
		}()
	}
	if *stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			logf("stdin closed")
			sigCh <- syscall.SIGTERM
		}()
	}

	p := newPKI(dir)
	if err := p.ensure(); err != nil {
		logf("certificates: %v", err)
		return 1
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", *port)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := p.writeKubeconfig(kubeconfig, server, *name); err != nil {
		logf("kubeconfig: %v", err)
		return 1
	}

	cmArgs := []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--controllers=*",
		"--service-account-private-key-file=" + p.saKey,
		"--flex-volume-plugin-dir=" + filepath.Join(dir, "flexvolume"),
		"--root-ca-file=" + p.caCert,
		"--cluster-signing-cert-file=" + p.caCert,
		"--cluster-signing-key-file=" + p.caKey,
		"--use-service-account-credentials=false",
		"--kube-api-qps=100",
		"--kube-api-burst=200",
		"--cluster-name=" + *name,
		"--service-cluster-ip-range=" + serviceCIDR,
		fmt.Sprintf("--v=%d", *verbosity),
	}
	cmArgs = append(cmArgs, strings.Fields(*extraCM)...)
	runControllerManager, err := prepareControllerManager(cmArgs)
	if err != nil {
		logf("%v", err)
		return 1
	}
	runScheduler, err := prepareScheduler([]string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		fmt.Sprintf("--v=%d", *verbosity),
	})
	if err != nil {
		logf("%v", err)
		return 1
	}

	etcdLevel := "error"
	if *verbosity >= 6 {
		etcdLevel = "info"
	} else if *verbosity >= 4 {
		etcdLevel = "warn"
	}
	etcdServer, etcdURL, err := startEtcd(dir, etcdLevel)
	if err != nil {
		logf("%v", err)
		return 1
	}
	etcd := &onceCloser{c: etcdServer}
	defer etcd.Close()
	logf("etcd ready at %s (%.1fs)", etcdURL, time.Since(start).Seconds())

	restCfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		logf("%v", err)
		return 1
	}
	restCfg.QPS, restCfg.Burst = 100, 200
	client := kubernetes.NewForConfigOrDie(restCfg)
	sim := newSimulator(client, *nodes, *nodePrefix)

	var cmStarted, schedStarted, saReady atomic.Bool
	clusterReady := readyCheck{name: "kube-testcluster", fn: func() error {
		if err := sim.Ready(); err != nil {
			return err
		}
		if !cmStarted.Load() || !schedStarted.Load() {
			return errors.New("controller-manager/scheduler not started")
		}
		if !saReady.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if _, err := client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{}); err != nil {
				return fmt.Errorf("default service account: %w", err)
			}
			saReady.Store(true)
			logf("cluster ready at %s (%.1fs)", server, time.Since(start).Seconds())
		}
		return nil
	}}

	apiArgs := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", *port),
		"--cert-dir=" + p.dir,
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caCert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saPub,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none",
		// dial simulated kubelets by IP (through the egress proxy), never
		// by looking their names up in DNS
		"--kubelet-preferred-address-types=InternalIP",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--event-ttl=30m",
		"--enable-garbage-collector=true",
		fmt.Sprintf("--v=%d", *verbosity),
	}
	apiArgs = append(apiArgs, strings.Fields(*extraAPI)...)

	var wg sync.WaitGroup
	apiCtx, apiCancel := context.WithCancel(context.Background())
	defer apiCancel()
	egressConfig, err := startEgressProxy(apiCtx, dir, *port)
	if err != nil {
		logf("%v", err)
		return 1
	}
	apiArgs = append(apiArgs, "--egress-selector-config-file="+egressConfig)
	apiDone := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		apiDone <- runAPIServer(apiCtx, apiArgs, clusterReady)
	}()

	// Controllers need a healthy API server before they start.
	if err := waitHealthy(ctx, restCfg, apiDone); err != nil {
		if ctx.Err() != nil {
			return shutdown(apiCancel, &wg, etcd, 0)
		}
		logf("kube-apiserver: %v", err)
		return shutdown(apiCancel, &wg, etcd, 1)
	}
	logf("kube-apiserver healthy (%.1fs)", time.Since(start).Seconds())

	compCtx, compCancel := context.WithCancel(ctx)
	defer compCancel()
	fatal := make(chan error, 3)
	wg.Add(3)
	go func() {
		defer wg.Done()
		cmStarted.Store(true)
		if err := runControllerManager(compCtx); err != nil && compCtx.Err() == nil {
			fatal <- fmt.Errorf("kube-controller-manager: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		schedStarted.Store(true)
		err := runScheduler(compCtx)
		if err != nil && compCtx.Err() == nil {
			fatal <- fmt.Errorf("kube-scheduler: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		sim.Run(klog.NewContext(compCtx, klog.Background()))
	}()

	code := 0
	select {
	case <-ctx.Done():
	case err := <-fatal:
		logf("%v", err)
		code = 1
	case err := <-apiDone:
		logf("kube-apiserver stopped: %v", err)
		apiDone <- err
		code = 1
	}
	compCancel()
	return shutdown(apiCancel, &wg, etcd, code)
}

// parked is closed when a component goroutine was parked by klog.OsExit:
// the shutdown then no longer waits for all components.
var parked = make(chan struct{})

type closer interface{ Close() }

type onceCloser struct {
	once sync.Once
	c    closer
}

func (o *onceCloser) Close() { o.once.Do(o.c.Close) }

func shutdown(apiCancel context.CancelFunc, wg *sync.WaitGroup, etcd closer, code int) int {
	apiCancel()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-parked:
		select {
		case <-done:
		case <-time.After(500 * time.Millisecond):
		}
	case <-time.After(5 * time.Second):
		logf("components still stopping after 5s, closing etcd anyway")
	}
	etcd.Close()
	klog.Flush()
	logf("stopped")
	return code
}

// waitHealthy polls /healthz until it answers ok.
func waitHealthy(ctx context.Context, cfg *rest.Config, apiDone chan error) error {
	c := rest.CopyConfig(cfg)
	c.Timeout = 2 * time.Second
	client, err := kubernetes.NewForConfig(c)
	if err != nil {
		return err
	}
	deadline := time.After(3 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-apiDone:
			apiDone <- err
			if err == nil {
				err = errors.New("exited")
			}
			return err
		case <-deadline:
			return errors.New("not healthy after 3 minutes")
		case <-tick.C:
		}
		body, err := client.Discovery().RESTClient().Get().AbsPath("/healthz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return nil
		}
	}
}
