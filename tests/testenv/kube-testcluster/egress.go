package main

// The API server dials into the "cluster" (kubelets for logs/exec, pod and
// service proxies, webhooks and aggregated APIs behind Services) through an
// egress selector. We point it at this in-process HTTP CONNECT proxy, which
// only lets connections to loopback addresses through: the simulated nodes,
// pods and services have made-up IPs, and tests must never send traffic to
// them (or anywhere off this machine).

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

type egressProxy struct {
	ln     net.Listener
	logged sync.Map // address -> struct{}
}

// startEgressProxy listens on an abstract unix socket (no path length or
// cleanup issues) and writes the egress selector configuration for it.
func startEgressProxy(ctx context.Context, dataDir string, port int) (configFile string, err error) {
	name := fmt.Sprintf("@kube-testcluster-egress-%d-%d", os.Getpid(), port)
	ln, err := net.Listen("unix", name)
	if err != nil {
		return "", fmt.Errorf("egress proxy: %w", err)
	}
	p := &egressProxy{ln: ln}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	go p.serve()

	configFile = filepath.Join(dataDir, "egress-selector.yaml")
	cfg := fmt.Sprintf(`apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: %q
`, name)
	if err := os.WriteFile(configFile, []byte(cfg), 0o644); err != nil {
		return "", err
	}
	return configFile, nil
}

func (p *egressProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

// isLoopbackHost accepts loopback IPs and "localhost". Other names are
// refused without a DNS lookup, so not even a query leaves the machine.
func isLoopbackHost(host string) bool {
	if ip := net.ParseIP(host); ip != nil {
		return ip.IsLoopback()
	}
	return host == "localhost"
}

func (p *egressProxy) handle(c net.Conn) {
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if req.Method != http.MethodConnect {
		fmt.Fprint(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
		return
	}
	addr := req.URL.Host
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		fmt.Fprint(c, "HTTP/1.1 400 Bad Request\r\n\r\n")
		return
	}
	if !isLoopbackHost(host) {
		if _, seen := p.logged.LoadOrStore(addr, struct{}{}); !seen {
			klog.InfoS("kube-testcluster: refusing API server connection beyond loopback (simulated cluster)", "address", addr)
		}
		fmt.Fprint(c, "HTTP/1.1 502 kube-testcluster allows no traffic beyond loopback\r\n\r\n")
		return
	}
	target, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		fmt.Fprint(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	defer target.Close()
	_ = c.SetReadDeadline(time.Time{})
	fmt.Fprint(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	if n := br.Buffered(); n > 0 {
		buf, _ := br.Peek(n)
		if _, err := target.Write(buf); err != nil {
			return
		}
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(target, c); closeWrite(target); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, target); closeWrite(c); done <- struct{}{} }()
	<-done
	<-done
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}
