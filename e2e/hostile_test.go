//go:build linux

package e2e

// Hostile tenants (issue 9): every attack is tried from inside a function,
// through the real agent, and must fail, while the legitimate use next to
// it works. The agent runs in a network namespace of the test's (its
// veth addresses stand for the node's own), "other hosts" in more
// namespaces behind veth pairs; test traffic never leaves them.
//
// Functions run the test binary itself as their tool (runProbe): it
// connects, sends and reads exactly as told and reports the errno and
// how long each attempt took, which a shell cannot.

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// The node's ports (its namespace is the test's: fixed ports are free)
// and the hosts around it.
const (
	nodeRedisPort     = 6379
	nodeGRPCPort      = 50052
	nodeMetricsPort   = 9464
	nodeOTLPPort      = 4317
	peerPort          = 8080 // "another host": functions may reach it
	metaPort          = 80   // the metadata and denied host
	sidecarPort       = 8125 // on the node, opened by network_allow
	closedSidecarPort = 8126 // on the node, not opened
	resolverAddr      = "127.0.0.53"
	resolverOtherPort = 5353 // the resolver's address, another port
	peerName          = "peer.hostile.test"
)

// The peer host's and the metadata host's addresses.
const (
	peerV4 = "10.200.1.2"
	peerV6 = "fd00:200:1::2"
	metaV4 = "10.200.2.2"
	metaV6 = "fd00:200:2::2"
)

var (
	nodePeerAddrs = []string{"10.200.1.1/24", "fd00:200:1::1/64"}
	peerAddrs     = []string{peerV4 + "/24", peerV6 + "/64"}
	nodeMetaAddrs = []string{"10.200.2.1/24", "fd00:200:2::1/64"}
	metaAddrs     = []string{metaV4 + "/24", metaV6 + "/64"}
	// deniedCIDRs are sandbox.network_deny: the metadata host's network.
	deniedCIDRs  = []string{"10.200.2.0/24", "fd00:200:2::/64"}
	metadataAddr = "169.254.169.254"
	// lateNodeAddrs are added to the node after the agent started.
	lateNodeAddrs = []string{"10.200.1.77/24", "fd00:200:1::77/64"}
)

// hostileNode is a node of the test's: its namespace with Redis and the
// node's own services in it, a peer host, and a host holding the cloud
// metadata address, all behind veth pairs.
type hostileNode struct {
	node, peer, meta *netns
	// dir is world-readable: files functions may see (their tool, triggers).
	dir           string
	resolvConf    string
	redisPassword string
	probe         string
	// abstract names a Unix socket in the abstract namespace that a node
	// service (root) listens on.
	abstract string

	mu        sync.Mutex
	recorders map[string]*datagrams // by namespace and address of the UDP listener
	agentIDs  []string
}

// newHostileNode builds the topology; everything goes at the end of the
// test, and the host is checked to hold nothing more than before.
func newHostileNode(t *testing.T) *hostileNode {
	t.Helper()
	requireRoot(t)
	requireRunner(t)
	for _, tool := range []string{"ip", "nsenter", "unshare", "redis-server", "ipcmk", "getent", "ps"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipUnlessRequired(t, "root", "needs %s: %v (CI installs it: scripts/test-all.sh)", tool, err)
		}
	}
	h := &hostileNode{recorders: map[string]*datagrams{}}
	checkHostRestored(t, func() []string {
		h.mu.Lock()
		defer h.mu.Unlock()
		return slices.Clone(h.agentIDs)
	})
	h.dir = sharedDir(t)
	h.probe = hostileProbe(t)
	h.redisPassword = "redis-pw-" + randomHex(t, 8)

	h.node = newNetns(t, "node")
	h.peer = newNetns(t, "peer")
	h.meta = newNetns(t, "meta")
	link(t, h.node, "eth-peer", nodePeerAddrs, h.peer, "eth0", peerAddrs)
	link(t, h.node, "eth-meta", nodeMetaAddrs, h.meta, "eth0", metaAddrs)
	// The metadata address is another host's, routed as in a cloud: a
	// function that reached it would have passed the link-local block,
	// not hit a missing route or the node's own address.
	h.meta.ip(t, "addr", "add", metadataAddr+"/32", "dev", "lo")
	h.node.ip(t, "route", "add", metadataAddr+"/32", "via", metaV4)
	for _, n := range []*netns{h.node, h.peer, h.meta} {
		n.waitAddrsReady(t)
	}

	// The node's resolver is on loopback, as systemd-resolved's is.
	h.resolvConf = filepath.Join(h.dir, "resolv.conf")
	if err := os.WriteFile(h.resolvConf, []byte("nameserver "+resolverAddr+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	serveDNS(t, h.node.listenPacket(t, "udp", net.JoinHostPort(resolverAddr, "53")), map[string][]netip.Addr{
		peerName: {netip.MustParseAddr(peerV4), netip.MustParseAddr(peerV6)},
	})
	h.startRedis(t, h.node)

	// The node's services: UDP on the agent's and Redis's port numbers,
	// so a datagram that passed would be seen; a sidecar; the resolver's
	// other port; a service on an abstract Unix socket.
	for _, port := range []int{nodeGRPCPort, nodeMetricsPort, nodeRedisPort} {
		h.recordUDP(t, h.node, "[::]:"+strconv.Itoa(port))
	}
	serveBanner(t, h.node.listen(t, "tcp", "127.0.0.1:"+strconv.Itoa(sidecarPort)), "sidecar")
	h.recordUDP(t, h.node, "127.0.0.1:"+strconv.Itoa(sidecarPort))
	serveBanner(t, h.node.listen(t, "tcp", "127.0.0.1:"+strconv.Itoa(closedSidecarPort)), "closed-sidecar")
	serveBanner(t, h.node.listen(t, "tcp", net.JoinHostPort(resolverAddr, strconv.Itoa(resolverOtherPort))), "resolver-other")
	h.recordUDP(t, h.node, net.JoinHostPort(resolverAddr, strconv.Itoa(resolverOtherPort)))
	h.abstract = "@" + hostileMark + "-node-service-" + randomHex(t, 4)
	serveBanner(t, h.node.listen(t, "unix", h.abstract), "node-service")

	serveBanner(t, h.peer.listen(t, "tcp", "[::]:"+strconv.Itoa(peerPort)), "peer")
	h.recordUDP(t, h.peer, "[::]:"+strconv.Itoa(peerPort))
	serveBanner(t, h.meta.listen(t, "tcp", "[::]:"+strconv.Itoa(metaPort)), "metadata")
	h.recordUDP(t, h.meta, "[::]:"+strconv.Itoa(metaPort))
	return h
}

// sharedDir is a fresh directory functions can read and write.
func sharedDir(t *testing.T) string {
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o777)
	return dir
}

func (h *hostileNode) recordUDP(t *testing.T, n *netns, addr string) {
	d := recordDatagrams(t, n.listenPacket(t, "udp", addr))
	h.mu.Lock()
	h.recorders[n.Name+" "+addr] = d
	h.mu.Unlock()
}

// received says whether any UDP listener got token.
func (h *hostileNode) received(token string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, d := range h.recorders {
		if d.has(token) {
			return true
		}
	}
	return false
}

// startRedis runs a Redis for the agent in n (the node's namespace, or
// another host's), on every address there, with a password.
func (h *hostileNode) startRedis(t *testing.T, n *netns) {
	dir := t.TempDir()
	var addr string
	switch n {
	case h.node:
		addr = hostPort("127.0.0.1", nodeRedisPort)
	case h.meta:
		addr = hostPort(metaV4, nodeRedisPort)
	default:
		t.Fatalf("startRedis: no address known for %s", n.Name)
	}
	cmd := n.command("redis-server", "--port", strconv.Itoa(nodeRedisPort), "--bind", "0.0.0.0", "::",
		"--requirepass", h.redisPassword, "--save", "", "--appendonly", "no", "--dir", dir)
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	if !waitUntil(10*time.Second, func() bool {
		reply, err := h.redisCommand(addr, "AUTH "+h.redisPassword)
		return err == nil && reply == "+OK"
	}) {
		t.Fatalf("redis-server in %s did not answer:\n%s", n.Name, logs.String())
	}
}

// redisCommand sends one inline command from the node and reads the
// first reply line.
func (h *hostileNode) redisCommand(addr, command string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.node.dial(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, command+"\r\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// hostileAgentOptions shape an agent of the node.
type hostileAgentOptions struct {
	Network string
	// SandboxYAML, TelemetryYAML: more keys of those blocks, indented.
	SandboxYAML, TelemetryYAML string
	// YAML: more top-level blocks.
	YAML string
	// Creds: how the test reaches the agent; nil is plaintext.
	Creds credentials.TransportCredentials
	Env   []string
	// RedisAddr is the agent's Redis; "" is the node's own.
	RedisAddr string
}

// hostileAgent is a real agent running in the node's namespace.
type hostileAgent struct {
	*agent
	ID       string
	c        fluxpb.AgentServiceClient
	firstUID uint64
	lastUID  uint64
	// Scratch is the agent's sandbox.scratch_dir.
	Scratch string
	h       *hostileNode
}

// startAgent runs the agent in the node's namespace: its gRPC and
// metrics ports on every address there, its Redis the node's, and the
// node's resolv.conf (bound over /etc/resolv.conf in a mount namespace of
// its own; ip netns exec would do the same but also replace /sys, which
// hides the cgroups).
func (h *hostileNode) startAgent(t *testing.T, opts hostileAgentOptions) *hostileAgent {
	t.Helper()
	id := fmt.Sprintf("%s-%d-%d", hostileMark, os.Getpid(), agentCount.Add(1))
	h.mu.Lock()
	h.agentIDs = append(h.agentIDs, id)
	h.mu.Unlock()
	uids := nextUIDRange()
	first, last, _ := strings.Cut(uids, "-")
	a := &hostileAgent{ID: id, h: h, Scratch: filepath.Join(t.TempDir(), "scratch")}
	a.firstUID, _ = strconv.ParseUint(first, 10, 32)
	a.lastUID, _ = strconv.ParseUint(last, 10, 32)
	scratch := a.Scratch
	os.Chmod(filepath.Dir(scratch), 0o755)
	if err := os.Mkdir(scratch, 0o755); err != nil {
		t.Fatal(err)
	}
	redisAddr := opts.RedisAddr
	if redisAddr == "" {
		redisAddr = hostPort("127.0.0.1", nodeRedisPort)
	}
	cfg := fmt.Sprintf(`listen_address: ""
port: %d
redis_addr: "redis://:%s@%s"
telemetry:
  metrics_address: "[::]:%d"
%ssandbox:
  uid_range: %s
  network: %s
  scratch_dir: %s
%s%s`, nodeGRPCPort, h.redisPassword, redisAddr, nodeMetricsPort, opts.TelemetryYAML,
		uids, opts.Network, scratch, opts.SandboxYAML, opts.YAML)
	wrap := []string{"nsenter", "--net=" + h.node.Path, "--",
		"unshare", "--mount", "--propagation", "slave", "--",
		"sh", "-c", `mount --bind "$1" /etc/resolv.conf && shift && exec "$@"`, "sh", h.resolvConf}
	a.agent = startAgent(t, &redisServer{Addr: redisAddr},
		agentOptions{YAML: cfg, AgentID: id, Env: opts.Env, Wrap: wrap})
	// The agent is built with the race detector: what it finds while
	// hostile functions run is a failure too (stopped first, so that the
	// shutdown is looked at as well).
	t.Cleanup(func() {
		a.stop()
		if strings.Contains(a.logs.String(), "WARNING: DATA RACE") {
			t.Errorf("the race detector found a data race in the agent (its log is below)")
		}
	})
	creds := opts.Creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	conn, err := grpc.NewClient("passthrough:///127.0.0.1:"+strconv.Itoa(nodeGRPCPort),
		grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return h.node.dial(ctx, "tcp", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	a.c = fluxpb.NewAgentServiceClient(conn)
	return a
}

// ownsUID says whether uid is one of the agent's functions'.
func (a *hostileAgent) ownsUID(uid uint64) bool { return uid >= a.firstUID && uid <= a.lastUID }

// metrics scrapes the agent's /metrics from inside the node.
func (a *hostileAgent) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return a.h.node.dial(ctx, network, addr)
		},
	}}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", nodeMetricsPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %d %v", resp.StatusCode, err)
	}
	return parseMetrics(t, string(body))
}

// shq quotes s for sh.
func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// waitForTrigger is shell that blocks until the file named by the
// function's argument number arg exists.
func waitForTrigger(arg int) string {
	return fmt.Sprintf("while [ ! -e \"$%d\" ]; do sleep 0.02; done\n", arg)
}

// tryExec is execSync for goroutines: it returns what went wrong.
func tryExec(c fluxpb.AgentServiceClient, name string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, Args: args, ExecutionId: newID()})
	if err != nil {
		return "", "", err
	}
	return string(resp.GetOutput()), resp.GetError(), nil
}

// runOK runs a function synchronously and fails the test unless it
// succeeded; it returns the output.
func runOK(t *testing.T, c fluxpb.AgentServiceClient, name string, args ...string) string {
	t.Helper()
	resp, id := execSync(t, c, name, args...)
	if resp.GetError() != "" {
		t.Fatalf("%s (%s) failed: %s\n%s", name, id, resp.GetError(), resp.GetOutput())
	}
	return string(resp.GetOutput())
}

// installConcurrent installs a function up to n of which may run at once.
func installConcurrent(t *testing.T, c fluxpb.AgentServiceClient, name, script string, n int32) {
	t.Helper()
	install(t, c, fn{Name: name, Script: script, Config: &fluxpb.FunctionConfig{MaxConcurrency: n}})
}

// outputValue finds "key=value" in a function's output.
func outputValue(out, key string) string {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// --- The functions' tool ------------------------------------------------

// probeCommand, as the test binary's first argument, makes it the tool a
// hostile function runs instead of the tests (see helperMains).
const probeCommand = "hostile-probe"

var probeOnce struct {
	sync.Once
	path string
	err  error
}

// hostileProbe copies the test binary where functions can run it (their
// /tmp is their own, the build's is not theirs to see).
func hostileProbe(t *testing.T) string {
	t.Helper()
	probeOnce.Do(func() {
		self, err := os.Executable()
		if err != nil {
			probeOnce.err = err
			return
		}
		probeOnce.path = filepath.Join(os.TempDir(), "hostile-probe")
		probeOnce.err = copyExecutable(self, probeOnce.path)
	})
	if probeOnce.err != nil {
		t.Fatalf("the functions' tool: %v", probeOnce.err)
	}
	return probeOnce.path
}

func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func init() { helperMains[probeCommand] = runProbe }

// runProbe is the tool's main.
func runProbe(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "probe: net TARGET…, selfloop, or cmdwatch HEX-SECRET TRIGGER")
		return 2
	}
	var err error
	switch args[0] {
	case "net":
		err = probeNet(os.Stdout, args[1:])
	case "selfloop":
		err = probeSelfLoop(os.Stdout)
	case "cmdwatch":
		if len(args) != 3 {
			err = errors.New("cmdwatch HEX-SECRET TRIGGER")
			break
		}
		secret, herr := hex.DecodeString(args[1])
		if herr != nil {
			err = herr
			break
		}
		err = probeCmdlines(os.Stdout, string(secret), args[2])
	default:
		err = fmt.Errorf("unknown probe %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		return 1
	}
	return 0
}

// netTarget is one attempt: proto tcp, udp or unix; kind what to do once
// connected (connect, banner, redis, http, grpc; raw for udp: send token).
type netTarget struct {
	proto, kind, addr, token string
}

func (tg netTarget) String() string {
	return strings.Join([]string{tg.proto, tg.kind, tg.addr, tg.token}, ",")
}

func parseNetTarget(s string) (netTarget, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 4 {
		return netTarget{}, fmt.Errorf("target %q: want proto,kind,addr,token", s)
	}
	return netTarget{parts[0], parts[1], parts[2], parts[3]}, nil
}

// probeResult is what the tool saw of one target.
type probeResult struct {
	Target string  `json:"target"`
	OK     bool    `json:"ok"`
	Errno  string  `json:"errno,omitempty"`
	Err    string  `json:"err,omitempty"`
	MS     float64 `json:"ms"`
	Reply  string  `json:"reply,omitempty"`
}

func (r *probeResult) fail(err error) {
	r.OK = false
	r.Err = err.Error()
	var errno syscall.Errno
	if errors.As(err, &errno) {
		r.Errno = unix.ErrnoName(errno)
	}
}

func probeNet(w io.Writer, args []string) error {
	enc := json.NewEncoder(w)
	for _, a := range args {
		tg, err := parseNetTarget(a)
		if err != nil {
			return err
		}
		if err := enc.Encode(probeOne(tg)); err != nil {
			return err
		}
	}
	return nil
}

func probeOne(tg netTarget) probeResult {
	res := probeResult{Target: tg.String()}
	if host, port, err := net.SplitHostPort(tg.addr); err == nil && tg.proto != "unix" {
		if _, err := netip.ParseAddr(host); err != nil { // a name: the node's resolver answers
			addrs, err := net.DefaultResolver.LookupHost(context.Background(), host)
			if err != nil {
				res.fail(err)
				return res
			}
			tg.addr = net.JoinHostPort(addrs[0], port)
		}
	}
	start := time.Now()
	elapsed := func() float64 { return float64(time.Since(start).Microseconds()) / 1000 }
	if tg.proto == "udp" {
		c, err := rawDial("udp", tg.addr, 3*time.Second)
		if err == nil {
			_, err = c.Write([]byte(tg.token))
			c.Close()
		}
		res.MS = elapsed()
		if err != nil {
			res.fail(err)
		} else {
			res.OK = true
		}
		return res
	}
	c, err := rawDial(tg.proto, tg.addr, 3*time.Second)
	res.MS = elapsed()
	if err != nil {
		res.fail(err)
		return res
	}
	defer c.Close()
	res.OK = true
	c.SetDeadline(time.Now().Add(3 * time.Second))
	var request string
	switch tg.kind {
	case "redis":
		request = "PING\r\n"
	case "http":
		request = "GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n"
	case "grpc":
		c.Close()
		res.Reply = probeGRPC(tg.addr)
		return res
	case "connect":
		return res
	}
	if request != "" {
		io.WriteString(c, request)
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	res.Reply = strings.TrimSpace(line)
	return res
}

// rawDial connects as a C program would, so that the kernel sees the
// address as written: an IPv6 socket (dual-stack) for an address written
// as IPv6 ("::", "::ffff:127.0.0.1" included; Go's dialer would pick
// IPv4 for the latter), IPv4 otherwise, a Unix socket ("@name" is
// abstract) for unix. timeout bounds a TCP connect.
func rawDial(proto, addr string, timeout time.Duration) (net.Conn, error) {
	family, typ := unix.AF_UNIX, unix.SOCK_STREAM
	var sa unix.Sockaddr = &unix.SockaddrUnix{Name: addr}
	if proto != "unix" {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, err
		}
		if a := ap.Addr(); a.Is4() {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
		} else {
			sa6 := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
			if a.Zone() != "" {
				iface, err := net.InterfaceByName(a.Zone())
				if err != nil {
					return nil, err
				}
				sa6.ZoneId = uint32(iface.Index)
			}
			family, sa = unix.AF_INET6, sa6
		}
		if proto == "udp" {
			typ = unix.SOCK_DGRAM
		}
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if family == unix.AF_INET6 {
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	f := os.NewFile(uintptr(fd), proto+" "+addr)
	defer f.Close()
	return net.FileConn(f)
}

// probeGRPC drives the agent's API as Flux would: it answers with the
// agent's id.
func probeGRPC(addr string) string {
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "error: " + err.Error()
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, err := fluxpb.NewAgentServiceClient(conn).ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{})
	if err != nil {
		return "error: " + err.Error()
	}
	return "agent_id=" + st.GetAgentId()
}

// probeSelfLoop talks to itself over its own loopback, IPv4 and IPv6.
func probeSelfLoop(w io.Writer) error {
	enc := json.NewEncoder(w)
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		res := probeResult{Target: "selfloop " + addr}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			res.fail(err)
			enc.Encode(res)
			continue
		}
		go func() {
			c, err := l.Accept()
			if err == nil {
				io.WriteString(c, "self\n")
				c.Close()
			}
		}()
		c, err := net.DialTimeout("tcp", l.Addr().String(), 3*time.Second)
		if err != nil {
			res.fail(err)
		} else {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			res.OK, res.Reply = true, strings.TrimSpace(line)
			c.Close()
		}
		l.Close()
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return nil
}

// cmdlineWatch is what probeCmdlines saw.
type cmdlineWatch struct {
	Scans int `json:"scans"`
	Hits  int `json:"hits"`
	PIDs  int `json:"pids"`
}

// probeCmdlines reads every /proc/*/cmdline it can, as fast as it can,
// until trigger exists, and counts those holding secret.
func probeCmdlines(w io.Writer, secret, trigger string) error {
	fmt.Fprintln(w, "watching")
	var res cmdlineWatch
	seen := map[string]bool{}
	for {
		if _, err := os.Stat(trigger); err == nil {
			break
		}
		entries, err := os.ReadDir("/proc")
		if err != nil {
			return err
		}
		for _, e := range entries {
			if e.Name()[0] < '0' || e.Name()[0] > '9' {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil {
				continue
			}
			seen[e.Name()] = true
			if strings.Contains(string(b), secret) {
				res.Hits++
			}
		}
		res.Scans++
	}
	res.PIDs = len(seen)
	return json.NewEncoder(w).Encode(res)
}

// parseProbe reads the tool's JSON lines out of a function's output.
func parseProbe(t *testing.T, out string) map[string]probeResult {
	t.Helper()
	results := map[string]probeResult{}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var r probeResult
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("probe line %q: %v", line, err)
		}
		results[r.Target] = r
	}
	return results
}

// --- Network ------------------------------------------------------------

// netCase is one attempt of a function and what must come of it.
type netCase struct {
	netTarget
	reach bool
	// reply is how a reached target answers (a prefix); "" takes any.
	reply string
	// control is where root on the node finds the target ("" = addr): a
	// target named by a DNS name is checked by its address.
	control string
	// sendMayPass: a refused datagram's send may succeed (it goes to the
	// function's own empty loopback); only its arrival counts.
	sendMayPass bool
}

var tokenSeq atomic.Int64

func newToken() string { return fmt.Sprintf("%s-tok-%d-%d", hostileMark, os.Getpid(), tokenSeq.Add(1)) }

func tcpCase(kind, addr string, reach bool, reply string) netCase {
	return netCase{netTarget: netTarget{proto: "tcp", kind: kind, addr: addr}, reach: reach, reply: reply}
}

func udpCase(addr string, reach bool) netCase {
	return netCase{netTarget: netTarget{proto: "udp", kind: "raw", addr: addr, token: newToken()}, reach: reach}
}

func hostPort(addr string, port int) string { return net.JoinHostPort(addr, strconv.Itoa(port)) }

// nodeAddrs is every address a function might try to reach the node
// by: the node's own (its loopback and veths, IPv6 link-local ones with
// their zone, those added after the agent started), another loopback
// address, the unspecified addresses (a connect to them lands on the
// node) and IPv4-mapped IPv6 forms.
func (h *hostileNode) nodeAddrs(t *testing.T) []string {
	var out []string
	for _, a := range h.node.addrs(t) {
		out = append(out, a.String())
	}
	return append(out, "127.0.0.2", "127.255.255.254", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:10.200.1.1")
}

// nodeCases are the agent's gRPC and metrics ports and Redis on every
// address of the node, TCP and UDP: reach says whether a function may.
func (h *hostileNode) nodeCases(t *testing.T, reach bool) []netCase {
	var cases []netCase
	for _, addr := range h.nodeAddrs(t) {
		for _, port := range []int{nodeGRPCPort, nodeMetricsPort, nodeRedisPort} {
			cases = append(cases, tcpCase("connect", hostPort(addr, port), reach, ""), udpCase(hostPort(addr, port), reach))
		}
	}
	return cases
}

func metadataCases(reach bool) []netCase {
	addr := hostPort(metadataAddr, metaPort)
	return []netCase{tcpCase("banner", addr, reach, "metadata"), udpCase(addr, reach)}
}

func peerCases(reach bool) []netCase {
	var cases []netCase
	for _, addr := range []string{peerV4, peerV6} {
		cases = append(cases, tcpCase("banner", hostPort(addr, peerPort), reach, "peer"), udpCase(hostPort(addr, peerPort), reach))
	}
	return cases
}

// checkNetwork proves each target is there (root on the node reaches it),
// runs every attempt from one function of a, and checks each came out as
// it must: refused ones fail fast (TCP ECONNREFUSED, a UDP send EPERM)
// and none of their datagrams arrives. It returns the execution's id.
func (h *hostileNode) checkNetwork(t *testing.T, a *hostileAgent, cases []netCase) string {
	t.Helper()
	h.controlUDP(t, cases, "ctl")
	var unreachable []string
	for _, c := range cases {
		if c.proto == "udp" {
			continue
		}
		addr := c.control
		if addr == "" {
			addr = c.addr
		}
		var conn net.Conn
		err := h.node.do(func() (err error) { conn, err = rawDial(c.proto, addr, 5*time.Second); return err })
		if err != nil {
			unreachable = append(unreachable, fmt.Sprintf("%s %s: %v", c.proto, addr, err))
			continue
		}
		conn.Close()
	}
	if len(unreachable) > 0 {
		t.Fatalf("control: root on the node cannot reach these, so the test would prove nothing:\n%s", strings.Join(unreachable, "\n"))
	}

	name := "netprobe"
	install(t, a.c, fn{Name: name, Script: "exec " + shq(h.probe) + " " + probeCommand + " net \"$@\"\n"})
	args := make([]string, len(cases))
	for i, c := range cases {
		args[i] = c.netTarget.String()
	}
	resp, id := execSync(t, a.c, name, args...)
	if resp.GetError() != "" {
		t.Fatalf("the probe failed: %s\n%s", resp.GetError(), resp.GetOutput())
	}
	results := parseProbe(t, string(resp.GetOutput()))
	// Every datagram the function sent is in its listener's queue before
	// these, sent after it ended.
	h.controlUDP(t, cases, "fence")

	refused, reached := 0, 0
	for _, c := range cases {
		r, ok := results[c.netTarget.String()]
		switch {
		case !ok:
			t.Errorf("%s: no result from the probe", c.netTarget)
		case c.reach && !r.OK:
			t.Errorf("%s: want reached, failed after %.1f ms: %s", c.netTarget, r.MS, r.Err)
		case c.reach && c.reply != "" && !strings.HasPrefix(r.Reply, c.reply):
			t.Errorf("%s: reached, answered %q, want %q", c.netTarget, r.Reply, c.reply)
		case c.reach && c.proto == "udp" && !h.received(c.token):
			t.Errorf("%s: sent, never arrived", c.netTarget)
		case !c.reach && c.proto == "udp" && h.received(c.token):
			t.Errorf("%s: the datagram arrived (send: ok=%v %s)", c.netTarget, r.OK, r.Errno)
		case !c.reach && r.OK && !(c.proto == "udp" && c.sendMayPass):
			t.Errorf("%s: a function reached it (reply %q)", c.netTarget, r.Reply)
		case !c.reach && r.MS > 1000:
			t.Errorf("%s: refused only after %.0f ms (%s): want at once", c.netTarget, r.MS, r.Err)
		}
		if ok && !c.reach && !r.OK {
			refused++
		}
		if ok && c.reach && r.OK {
			reached++
		}
	}
	t.Logf("%d attempts refused, %d reached as they should, from execution %s", refused, reached, id)
	if testing.Verbose() || t.Failed() {
		var lines []string
		for _, c := range cases {
			r := results[c.netTarget.String()]
			lines = append(lines, fmt.Sprintf("%-60s ok=%-5v %-12s %7.2f ms %s", c.netTarget, r.OK, r.Errno, r.MS, r.Reply))
		}
		t.Logf("attempts:\n%s", strings.Join(lines, "\n"))
	}
	return id
}

// controlUDP sends, as root on the node, a datagram to each UDP case's
// target and waits until every one arrived.
func (h *hostileNode) controlUDP(t *testing.T, cases []netCase, what string) {
	t.Helper()
	var tokens []string
	for _, c := range cases {
		if c.proto != "udp" {
			continue
		}
		addr := c.control
		if addr == "" {
			addr = c.addr
		}
		token := what + "-" + newToken()
		err := h.node.do(func() error {
			conn, err := rawDial("udp", addr, 5*time.Second)
			if err != nil {
				return err
			}
			defer conn.Close()
			_, err = conn.Write([]byte(token))
			return err
		})
		if err != nil {
			t.Fatalf("%s: root on the node cannot send to %s: %v", what, addr, err)
		}
		tokens = append(tokens, token)
	}
	if !waitUntil(10*time.Second, func() bool {
		return !slices.ContainsFunc(tokens, func(tok string) bool { return !h.received(tok) })
	}) {
		t.Fatalf("%s: datagrams root sent on the node did not all arrive: the test would prove nothing", what)
	}
}

// The default policy: a function reaches other hosts, a name through the
// node's loopback resolver, and what the operator opened; nothing of the
// node (the agent's ports and Redis on every address), no link-local
// address, no denied network.
func TestHostileNetworkFiltered(t *testing.T) {
	h := newHostileNode(t)
	spans := collectSpans(t, h.node)
	a := h.startAgent(t, hostileAgentOptions{
		Network: "filtered",
		SandboxYAML: fmt.Sprintf("  network_deny: [%s]\n  network_allow: [%q]\n",
			strings.Join(deniedCIDRs, ", "), hostPort("127.0.0.1", sidecarPort)),
		TelemetryYAML: fmt.Sprintf("  otlp_endpoint: \"http://127.0.0.1:%d\"\n  otlp_insecure: true\n", nodeOTLPPort),
		Env:           []string{"OTEL_BSP_SCHEDULE_DELAY=10"},
	})
	// Addresses the node gets later are the node's too.
	for _, addr := range lateNodeAddrs {
		args := []string{"addr", "add", addr, "dev", "eth-peer"}
		if strings.Contains(addr, ":") {
			args = append(args, "nodad")
		}
		h.node.ip(t, args...)
	}

	cases := h.nodeCases(t, false)
	cases = append(cases, metadataCases(false)...)
	for _, addr := range []string{metaV4, metaV6} { // network_deny
		cases = append(cases, tcpCase("banner", hostPort(addr, metaPort), false, ""), udpCase(hostPort(addr, metaPort), false))
	}
	resolverOther := hostPort(resolverAddr, resolverOtherPort)
	cases = append(cases,
		tcpCase("banner", resolverOther, false, ""), udpCase(resolverOther, false),
		tcpCase("banner", hostPort("127.0.0.1", closedSidecarPort), false, ""),
		// network_allow: the operator's sidecar.
		tcpCase("banner", hostPort("127.0.0.1", sidecarPort), true, "sidecar"), udpCase(hostPort("127.0.0.1", sidecarPort), true),
	)
	cases = append(cases, peerCases(true)...)
	byName := tcpCase("banner", hostPort(peerName, peerPort), true, "peer")
	byName.control = hostPort(peerV4, peerPort)
	cases = append(cases, byName)
	id := h.checkNetwork(t, a, cases)

	t.Run("name resolution", func(t *testing.T) {
		install(t, a.c, fn{Name: "resolve", Script: fmt.Sprintf(`getent hosts %s; echo "found=$?"
getent hosts nowhere.hostile.test; echo "missing=$?"
`, peerName)})
		out := runOK(t, a.c, "resolve")
		if outputValue(out, "found") != "0" || !(strings.Contains(out, peerV4) || strings.Contains(out, peerV6)) {
			t.Errorf("getent hosts %s did not resolve through the node's loopback resolver:\n%s", peerName, out)
		}
		// The resolver really was asked: it says the other name does not exist.
		if outputValue(out, "missing") != "2" {
			t.Errorf("getent hosts of a name the resolver does not know: want exit 2 (not found):\n%s", out)
		}
	})

	// A service of the node listening on an abstract Unix socket (as some
	// daemons do): functions share the node's network namespace, where
	// that namespace lives, and nftables never sees Unix sockets.
	t.Run("abstract unix socket of the node", func(t *testing.T) {
		h.checkNetwork(t, a, []netCase{{netTarget: netTarget{proto: "unix", kind: "banner", addr: h.abstract}}})
	})

	t.Run("refusals are reported", func(t *testing.T) {
		checkBlockedReported(t, a, spans, "netprobe", id)
	})
}

// The agent's Redis on another host: that host's address is refused to
// functions as the node's own are, while other hosts stay reachable.
func TestHostileNetworkRemoteRedis(t *testing.T) {
	h := newHostileNode(t)
	h.startRedis(t, h.meta)
	a := h.startAgent(t, hostileAgentOptions{Network: "filtered", RedisAddr: hostPort(metaV4, nodeRedisPort)})
	cases := []netCase{
		tcpCase("redis", hostPort(metaV4, nodeRedisPort), false, ""),
		// The address is protected whole: its other ports too.
		tcpCase("banner", hostPort(metaV4, metaPort), false, ""),
		udpCase(hostPort(metaV4, metaPort), false),
	}
	cases = append(cases, peerCases(true)...)
	h.checkNetwork(t, a, cases)
}

// No network but the function's own loopback.
func TestHostileNetworkNone(t *testing.T) {
	h := newHostileNode(t)
	a := h.startAgent(t, hostileAgentOptions{Network: "none"})

	install(t, a.c, fn{Name: "selfloop", Script: "exec " + shq(h.probe) + " " + probeCommand + " selfloop\n"})
	results := parseProbe(t, runOK(t, a.c, "selfloop"))
	if len(results) != 2 {
		t.Fatalf("selfloop: %v", results)
	}
	for target, r := range results {
		if !r.OK || r.Reply != "self" {
			t.Errorf("%s: a function cannot use its own loopback: %+v", target, r)
		}
	}

	cases := h.nodeCases(t, false)
	cases = append(cases, peerCases(false)...)
	cases = append(cases, metadataCases(false)...)
	cases = append(cases, tcpCase("banner", hostPort("127.0.0.1", sidecarPort), false, ""),
		netCase{netTarget: netTarget{proto: "unix", kind: "banner", addr: h.abstract}})
	for i := range cases {
		// A datagram to 127.0.0.1 leaves fine, into the function's own
		// empty loopback: only that none reaches the node counts.
		cases[i].sendMayPass = true
	}
	h.checkNetwork(t, a, cases)
}

// The node's network as is: everything is reachable, the agent's own API
// and Redis included. This is why host is documented as unsafe.
func TestHostileNetworkHost(t *testing.T) {
	h := newHostileNode(t)
	a := h.startAgent(t, hostileAgentOptions{Network: "host"})

	var cases []netCase
	for _, addr := range []string{"127.0.0.1", "10.200.1.1", "::1", "fd00:200:1::1"} {
		cases = append(cases,
			// A function drives the agent's API as Flux would.
			tcpCase("grpc", hostPort(addr, nodeGRPCPort), true, "agent_id="+a.ID),
			tcpCase("http", hostPort(addr, nodeMetricsPort), true, "HTTP/1.0 200"),
			// Redis answers; only its password stands between it and
			// every function's secrets.
			tcpCase("redis", hostPort(addr, nodeRedisPort), true, "-NOAUTH"),
			udpCase(hostPort(addr, nodeRedisPort), true))
	}
	cases = append(cases, peerCases(true)...)
	cases = append(cases, metadataCases(true)...)
	// Abstract Unix sockets are scoped by the slot's Landlock domain in
	// every network mode where the kernel has scopes (Linux 6.12+); host
	// leaves them reachable only without.
	cases = append(cases, netCase{netTarget: netTarget{proto: "unix", kind: "banner", addr: h.abstract}, reach: !landlockScopes(), reply: "node-service"})
	h.checkNetwork(t, a, cases)
}

// landlockScopes says whether this kernel has Landlock scopes (ABI 6+).
func landlockScopes() bool {
	abi, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	return errno == 0 && abi >= 6
}

// --- Reports of refused connections -------------------------------------

// spanSink is an OTLP trace receiver in the node's namespace.
type spanSink struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.Span
}

func (s *spanSink) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			s.spans = append(s.spans, ss.GetSpans()...)
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

// execution returns the execution span of id, nil while none arrived.
func (s *spanSink) execution(id string) *tracepb.Span {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range s.spans {
		if sp.GetName() != telemetry.SpanExecution {
			continue
		}
		for _, kv := range sp.GetAttributes() {
			if kv.GetKey() == string(telemetry.AttrExecutionID) && kv.GetValue().GetStringValue() == id {
				return sp
			}
		}
	}
	return nil
}

func collectSpans(t *testing.T, n *netns) *spanSink {
	sink := &spanSink{}
	srv := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(srv, sink)
	l := n.listen(t, "tcp", hostPort("127.0.0.1", nodeOTLPPort))
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return sink
}

// checkBlockedReported: the issue wants blocked attempts counted in a
// metric by function and visible in the execution's span.
func checkBlockedReported(t *testing.T, a *hostileAgent, spans *spanSink, function, id string) {
	var span *tracepb.Span
	if !waitUntil(15*time.Second, func() bool { span = spans.execution(id); return span != nil }) {
		t.Fatalf("no %s span of execution %s reached the collector", telemetry.SpanExecution, id)
	}
	var keys []string
	found := false
	for _, kv := range span.GetAttributes() {
		keys = append(keys, kv.GetKey())
		if strings.Contains(kv.GetKey(), "blocked") && kv.GetValue().GetIntValue() > 0 {
			found = true
		}
	}
	if !found {
		t.Errorf("the span of execution %s, whose function was refused dozens of connections, says nothing of them: no attribute *blocked* > 0 among %v", id, keys)
	}
	var series []string
	counted := false
	for name, v := range a.metrics(t) {
		if strings.Contains(name, "block") || strings.Contains(name, "refused") || strings.Contains(name, "denied") {
			series = append(series, fmt.Sprintf("%s %v", name, v))
			if strings.Contains(name, `function="`+function+`"`) && v > 0 {
				counted = true
			}
		}
	}
	if !counted {
		t.Errorf("/metrics counts no refused connection of function %s (series about blocking: %v)", function, series)
	}
}

// --- Tenants on one node ------------------------------------------------

// TestHostileTenants: executions of one agent (default sandbox, TLS, a
// config file anyone could read) cannot see each other's files, IPC
// objects, processes or secrets, nor the agent's files, and leave nothing
// behind.
func TestHostileTenants(t *testing.T) {
	h := newHostileNode(t)
	pki := newFluxPKI(t)
	files := t.TempDir()
	os.Chmod(filepath.Dir(files), 0o755)
	os.Chmod(files, 0o755)
	pki.writeAgentFiles(t, files)
	neighbour := filepath.Join(files, "notes.txt")
	neighbourText := "plain-neighbour-" + randomHex(t, 6)
	if err := os.WriteFile(neighbour, []byte(neighbourText+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	adminSocket := filepath.Join(files, "admin.sock")
	a := h.startAgent(t, hostileAgentOptions{
		Network: "filtered",
		YAML: tlsYAML(filepath.Join(files, "ca.pem"), filepath.Join(files, "agent.pem"), filepath.Join(files, "agent-key.pem")) +
			fmt.Sprintf("admin:\n  socket: %s\n", adminSocket),
		Creds: tlsCreds(pki.clientConfig(pki.Client.TLS)),
	})
	// On purpose: everything of the agent's is readable by anyone, so
	// that only the sandbox stands between it and a function.
	for _, p := range []string{a.ConfigPath, filepath.Join(files, "ca.pem"), filepath.Join(files, "agent.pem"), filepath.Join(files, "agent-key.pem")} {
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if cfg, err := os.ReadFile(a.ConfigPath); err != nil || !strings.Contains(string(cfg), h.redisPassword) {
		t.Fatalf("the agent's config should hold the Redis password: %v", err)
	}

	t.Run("temporary files", func(t *testing.T) { testTempFiles(t, a) })
	t.Run("tmp_size", func(t *testing.T) { testTmpSize(t, a) })
	t.Run("SysV IPC and POSIX shm", func(t *testing.T) { testIPC(t, a) })
	t.Run("process view", func(t *testing.T) { testProcessView(t, a) })
	t.Run("agent files", func(t *testing.T) {
		testAgentFiles(t, a, []string{a.ConfigPath, filepath.Join(files, "agent-key.pem"), filepath.Join(files, "agent.pem"), filepath.Join(files, "ca.pem")},
			neighbour, neighbourText)
	})
	t.Run("env never in argv", func(t *testing.T) { testEnvNotInArgv(t, a) })
	t.Run("names", func(t *testing.T) { testListableNames(t, a) })
	t.Run("admin socket", func(t *testing.T) { testAdminSocket(t, a, adminSocket) })
}

// startWaiting starts an async execution and waits until its output says
// ready; a function given the trigger as its last argument waits for it.
func startWaiting(t *testing.T, c fluxpb.AgentServiceClient, name string, args ...string) (id, output string) {
	t.Helper()
	id = execAsync(t, c, name, args...)
	rec := waitRecord(t, c, id, 30*time.Second, "ready", func(r *record) bool {
		return strings.Contains(r.Output, "ready") || isFinal(r)
	})
	if isFinal(rec) {
		t.Fatalf("%s (%s) ended before it was ready: %s %s\n%s", name, id, rec.Status, rec.Error, rec.Output)
	}
	return id, rec.Output
}

// finish fires tr and waits for each execution to succeed; it returns
// their outputs.
func finish(t *testing.T, c fluxpb.AgentServiceClient, tr trigger, ids ...string) []string {
	t.Helper()
	tr.fire(t)
	var outs []string
	for _, id := range ids {
		rec := waitRecord(t, c, id, 30*time.Second, "final status", isFinal)
		if rec.Status != "success" {
			t.Errorf("execution %s: %s %s\n%s", id, rec.Status, rec.Error, rec.Output)
		}
		outs = append(outs, rec.Output)
	}
	return outs
}

// onReusedSlot runs waves of concurrent executions of name (it prints
// uid=, then ready, then waits for the trigger, its last argument) until
// one ran with uid, the slot an earlier execution had: all of a wave run
// at once, so they take every free slot. It returns every output.
func onReusedSlot(t *testing.T, a *hostileAgent, name, uid string, args ...string) []string {
	t.Helper()
	var all []string
	for _, n := range []int{8, 16, 32} {
		tr := newTrigger(t)
		ids := make([]string, n)
		for i := range ids {
			ids[i], _ = startWaiting(t, a.c, name, append(slices.Clone(args), string(tr))...)
		}
		outs := finish(t, a.c, tr, ids...)
		all = append(all, outs...)
		if slices.ContainsFunc(outs, func(out string) bool { return outputValue(out, "uid") == uid }) {
			t.Logf("the slot of uid %s ran again in a wave of %d", uid, n)
			return all
		}
	}
	t.Fatalf("no execution ran with uid %s again: its slot was not reused (retired?), so its cleaning is unproven", uid)
	return nil
}

func testTempFiles(t *testing.T, a *hostileAgent) {
	token := randomHex(t, 8)
	installConcurrent(t, a.c, "tmp-writer", `T=$1
for d in /tmp /var/tmp /dev/shm; do echo "secret-$T" > "$d/hostile-$T" || echo "write-failed=$d"; done
echo "secret-$T" > "$TMPDIR/hostile-y-$T" || echo "write-failed=$TMPDIR"
echo "uid=$(id -u)"
echo ready
`+waitForTrigger(2), 5)
	installConcurrent(t, a.c, "tmp-reader", `T=$1
for p in /tmp/hostile-$T /var/tmp/hostile-$T /dev/shm/hostile-$T "$TMPDIR/hostile-y-$T"; do
  cat "$p" 2>/dev/null && echo "read=$p"
done
ls -a /tmp /var/tmp /dev/shm
cat /proc/[0-9]*/root/tmp/hostile-$T /proc/[0-9]*/root/dev/shm/hostile-$T 2>/dev/null
find /tmp /var/tmp /dev/shm /run /var/lib/flux-agent-tests -name "*$T*" 2>/dev/null
echo mine > /tmp/own && cat /tmp/own
echo "uid=$(id -u)"
`, 5)
	installConcurrent(t, a.c, "tmp-next", `echo "uid=$(id -u)"
ls -a /tmp /var/tmp /dev/shm
cat /tmp/hostile-* /var/tmp/hostile-* /dev/shm/hostile-* 2>/dev/null
df -k /tmp | tail -1
echo ready
`+waitForTrigger(1), 32)

	tr := newTrigger(t)
	writer, out := startWaiting(t, a.c, "tmp-writer", token, string(tr))
	if strings.Contains(out, "write-failed") {
		t.Fatalf("the writer could not write its own temporary dirs:\n%s", out)
	}
	writerUID := outputValue(out, "uid")

	reader := runOK(t, a.c, "tmp-reader", token)
	if strings.Contains(reader, token) || strings.Contains(reader, "read=") {
		t.Errorf("a concurrent execution found the other's temporary files:\n%s", reader)
	}
	if !strings.Contains(reader, "mine") {
		t.Errorf("an execution cannot use its own /tmp:\n%s", reader)
	}
	if outputValue(reader, "uid") == writerUID {
		t.Errorf("two concurrent executions ran with one uid %s", writerUID)
	}
	agentRoot := fmt.Sprintf("/proc/%d/root", a.cmd.Process.Pid)
	checkNodeHasNo(t, token, "/", agentRoot)

	finish(t, a.c, tr, writer)
	checkNodeHasNo(t, token, "/", agentRoot)
	for _, out := range onReusedSlot(t, a, "tmp-next", writerUID) {
		if strings.Contains(out, token) {
			t.Errorf("a later execution found what an earlier one left:\n%s", out)
		}
	}
}

// checkNodeHasNo fails if the node's /tmp, /var/tmp or /dev/shm, seen
// from each root, holds a name with token.
func checkNodeHasNo(t *testing.T, token string, roots ...string) {
	t.Helper()
	for _, root := range roots {
		for _, dir := range []string{"/tmp", "/var/tmp", "/dev/shm"} {
			entries, err := os.ReadDir(filepath.Join(root, dir))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				if strings.Contains(e.Name(), token) {
					t.Errorf("%s holds %s, a function's file", filepath.Join(root, dir), e.Name())
				}
			}
		}
	}
}

func testTmpSize(t *testing.T, a *hostileAgent) {
	install(t, a.c, fn{Name: "fill", Script: `df -k /tmp | awk 'NR==2 {print "size_kb=" $2}'
dd if=/dev/zero of=/tmp/fill bs=1M count=80 2>&1; echo "tmp=$?"
dd if=/dev/zero of=/dev/shm/more bs=1M count=1 2>&1; echo "shm=$?"
`})
	out := runOK(t, a.c, "fill")
	if outputValue(out, "size_kb") != strconv.Itoa(64<<10) {
		t.Errorf("the private /tmp is not the default 64 MiB:\n%s", out)
	}
	if !strings.Contains(out, "No space left on device") || outputValue(out, "tmp") == "0" || outputValue(out, "shm") == "0" {
		t.Errorf("writing past tmp_size did not fail with ENOSPC (/dev/shm shares the bound):\n%s", out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if resp, err := a.c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{}); err != nil || !resp.GetHealthy() {
		t.Fatalf("the agent after a full tmpfs: %v %v", resp, err)
	}

	// Legitimate use next to it.
	install(t, a.c, fn{Name: "legit", Script: `dd if=/dev/zero of="$TMPDIR/ten" bs=1M count=10 2>&1 >/dev/null; echo "written=$(wc -c < "$TMPDIR/ten")"
echo "whoami=$(whoami)"
echo "tmpdir=$TMPDIR"
`})
	out = runOK(t, a.c, "legit")
	if outputValue(out, "written") != strconv.Itoa(10<<20) {
		t.Errorf("a function cannot write 10 MiB to $TMPDIR:\n%s", out)
	}
	if name := outputValue(out, "whoami"); name == "" || strings.Trim(name, "0123456789") == "" {
		t.Errorf("whoami prints no name:\n%s", out)
	}
}

// ipcObject is a SysV IPC object as /proc/sysvipc lists it.
type ipcObject struct {
	kind, id string
	uid      uint64
}

// sysvIPC lists the SysV IPC objects of the caller's IPC namespace.
func sysvIPC(t *testing.T) []ipcObject {
	t.Helper()
	var out []ipcObject
	for _, kind := range []string{"shm", "msg", "sem"} {
		b, err := os.ReadFile("/proc/sysvipc/" + kind)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		header := strings.Fields(lines[0])
		uidCol := slices.Index(header, "uid")
		idCol := slices.IndexFunc(header, func(f string) bool {
			return strings.HasSuffix(f, "id") && f != "uid" && f != "gid" && f != "cuid" && f != "cgid"
		})
		for _, line := range lines[1:] {
			fields := strings.Fields(line)
			if uidCol < 0 || uidCol >= len(fields) || idCol < 0 {
				t.Fatalf("/proc/sysvipc/%s: %q", kind, line)
			}
			uid, _ := strconv.ParseUint(fields[uidCol], 10, 32)
			out = append(out, ipcObject{kind: kind, id: fields[idCol], uid: uid})
		}
	}
	return out
}

func testIPC(t *testing.T, a *hostileAgent) {
	token := randomHex(t, 8)
	count := `echo "objects=$(cat /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem | grep -vc '^ *key')"` + "\n"
	installConcurrent(t, a.c, "ipc-maker", `ipcmk -M 65536 && ipcmk -Q && ipcmk -S 1 || echo ipcmk-failed
: > "/dev/shm/psx-$1" || echo shm-failed
`+count+`echo "uid=$(id -u)"
echo ready
`+waitForTrigger(2), 5)
	installConcurrent(t, a.c, "ipc-viewer", count+"ipcs\nls -a /dev/shm\n", 5)

	tr := newTrigger(t)
	maker, out := startWaiting(t, a.c, "ipc-maker", token, string(tr))
	if strings.Contains(out, "failed") || outputValue(out, "objects") != "3" {
		t.Fatalf("a function cannot make its own IPC objects:\n%s", out)
	}
	hostHasNone := func(when string) {
		for _, o := range sysvIPC(t) {
			if a.ownsUID(o.uid) {
				t.Errorf("%s: the host's IPC namespace holds a function's %s %s (uid %d)", when, o.kind, o.id, o.uid)
			}
		}
	}
	hostHasNone("while it runs")
	viewer := runOK(t, a.c, "ipc-viewer")
	if outputValue(viewer, "objects") != "0" || strings.Contains(viewer, token) {
		t.Errorf("a concurrent execution sees the other's IPC objects:\n%s", viewer)
	}
	finish(t, a.c, tr, maker)
	hostHasNone("after it ended")
	checkNodeHasNo(t, token, "/", fmt.Sprintf("/proc/%d/root", a.cmd.Process.Pid))
	if next := runOK(t, a.c, "ipc-viewer"); outputValue(next, "objects") != "0" || strings.Contains(next, token) {
		t.Errorf("a later execution sees IPC objects an earlier one left:\n%s", next)
	}
}

func testProcessView(t *testing.T, a *hostileAgent) {
	installConcurrent(t, a.c, "proc-a", `echo "pid=$$"
echo ready
`+waitForTrigger(1), 5)
	installConcurrent(t, a.c, "proc-b", `echo "self=$$"
echo "pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
ps -e -o pid=,user=,args=
`, 5)
	tr := newTrigger(t)
	other, out := startWaiting(t, a.c, "proc-a", string(tr))
	otherPID := outputValue(out, "pid")
	view := runOK(t, a.c, "proc-b")
	finish(t, a.c, tr, other)

	pids := strings.Fields(outputValue(view, "pids"))
	if self := outputValue(view, "self"); !slices.Contains(pids, self) {
		t.Errorf("a function does not see its own process %s in /proc:\n%s", self, view)
	}
	agentPID := strconv.Itoa(a.cmd.Process.Pid)
	for _, hidden := range []string{otherPID, agentPID, "1"} {
		if slices.Contains(pids, hidden) {
			t.Errorf("a function sees process %s in /proc (another execution %s, the agent %s):\n%s", hidden, otherPID, agentPID, view)
		}
	}
	for _, line := range strings.Split(view, "\n") {
		if f := strings.Fields(line); len(f) > 0 && (f[0] == otherPID || f[0] == agentPID) {
			t.Errorf("ps in a function shows %q", line)
		}
	}
	if strings.Contains(view, agentBinary) {
		t.Errorf("ps in a function shows the agent:\n%s", view)
	}
}

func testAgentFiles(t *testing.T, a *hostileAgent, agentFiles []string, neighbour, neighbourText string) {
	agentPID := a.cmd.Process.Pid
	paths := append(slices.Clone(agentFiles),
		fmt.Sprintf("/proc/%d/root%s", agentPID, a.ConfigPath),
		fmt.Sprintf("/proc/%d/environ", agentPID),
		fmt.Sprintf("/proc/%d/cmdline", agentPID),
		neighbour)
	install(t, a.c, fn{Name: "peek", Script: `for f in "$@"; do echo "== $f"; cat "$f" 2>&1 | head -c 4000; echo; done
head -1 handler.sh
`})
	out := runOK(t, a.c, "peek", paths...)
	for _, leak := range []string{a.h.redisPassword, "PRIVATE KEY", "BEGIN CERTIFICATE", "redis_addr", "AGENT_CONFIG"} {
		if strings.Contains(out, leak) {
			t.Errorf("a function read the agent's %q:\n%s", leak, out)
		}
	}
	// The same files' neighbour, as readable, and its own code are there:
	// the agent's files are masked, not the whole directory.
	if !strings.Contains(out, neighbourText) || !strings.Contains(out, "#!/bin/sh") {
		t.Errorf("a function cannot read a world-readable file or its own code:\n%s", out)
	}
}

// cmdlinePoller reads every /proc/*/cmdline as root, as fast as it can.
type cmdlinePoller struct {
	needles []string
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	hits    map[string]int
	samples []string // the first cmdlines with a needle
	scans   int
	pids    map[string]bool
}

func pollCmdlines(needles ...string) *cmdlinePoller {
	p := &cmdlinePoller{needles: needles, stop: make(chan struct{}), done: make(chan struct{}), hits: map[string]int{}, pids: map[string]bool{}}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			default:
			}
			entries, _ := os.ReadDir("/proc")
			for _, e := range entries {
				if e.Name()[0] < '0' || e.Name()[0] > '9' {
					continue
				}
				b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
				if err != nil {
					continue
				}
				p.mu.Lock()
				p.pids[e.Name()] = true
				for _, n := range p.needles {
					if strings.Contains(string(b), n) {
						p.hits[n]++
						if len(p.samples) < 8 {
							p.samples = append(p.samples, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
						}
					}
				}
				p.mu.Unlock()
			}
			p.mu.Lock()
			p.scans++
			p.mu.Unlock()
		}
	}()
	return p
}

func (p *cmdlinePoller) hitsOf(needle string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hits[needle]
}

func (p *cmdlinePoller) close() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
}

func testEnvNotInArgv(t *testing.T, a *hostileAgent) {
	secret := "hostile-env-secret-" + randomHex(t, 8)
	control := "hostile-argv-control-" + randomHex(t, 8)
	// A child with the env (never in an argv: the function itself must
	// not put it there either).
	install(t, a.c, fn{Name: "vault", Script: fmt.Sprintf(`sh -c '[ "${#HOSTILE_SECRET}" -eq %d ] && echo has-secret'
/bin/true
`, len(secret)), Config: &fluxpb.FunctionConfig{MaxConcurrency: 16, Env: map[string]string{"HOSTILE_SECRET": secret}}})
	// Its arguments are in its argv, as they must be: the pollers must see
	// them, or they prove nothing.
	install(t, a.c, fn{Name: "argv-control", Script: "echo ready\n" + waitForTrigger(2)})
	install(t, a.c, fn{Name: "cmdwatch", Script: "exec " + shq(a.h.probe) + " " + probeCommand + " cmdwatch \"$1\" \"$2\"\n"})

	poller := pollCmdlines(secret, control)
	defer poller.close()
	tr := newTrigger(t)
	// The watcher gets the secret hex-encoded: in its own argv as it is,
	// it would find itself.
	watcher := execAsync(t, a.c, "cmdwatch", hex.EncodeToString([]byte(secret)), string(tr))
	waitRecord(t, a.c, watcher, 30*time.Second, "watching", func(r *record) bool { return strings.Contains(r.Output, "watching") || isFinal(r) })
	ctl, _ := startWaiting(t, a.c, "argv-control", control, string(tr))
	if !waitUntil(10*time.Second, func() bool { return poller.hitsOf(control) > 0 }) {
		t.Fatal("the root poller never saw a function's argument in its cmdline: it proves nothing")
	}

	const burst, parallel = 48, 8
	var wg sync.WaitGroup
	errs := make(chan string, burst)
	sem := make(chan struct{}, parallel)
	for range burst {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out, execErr, err := tryExec(a.c, "vault")
			if err != nil || execErr != "" || !strings.Contains(out, "has-secret") {
				errs <- fmt.Sprintf("%v %s %q", err, execErr, out)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Errorf("an execution of the burst: %s", e)
	}
	outs := finish(t, a.c, tr, watcher, ctl)
	poller.close()

	poller.mu.Lock()
	scans, pids, hits, samples := poller.scans, len(poller.pids), poller.hits[secret], poller.samples
	poller.mu.Unlock()
	if hits > 0 {
		t.Errorf("the env secret was in a cmdline %d times while %d executions started; cmdlines with a secret or the control:\n%s",
			hits, burst, strings.Join(samples, "\n"))
	}
	var inside cmdlineWatch
	for _, line := range strings.Split(outs[0], "\n") {
		if strings.HasPrefix(line, "{") {
			json.Unmarshal([]byte(line), &inside)
		}
	}
	if inside.Scans == 0 || inside.Hits > 0 {
		t.Errorf("from inside a function: %+v (want scans and no hit)", inside)
	}
	t.Logf("root read %d processes' cmdlines in %d scans during the burst of %d, a function %d processes in %d scans: no secret",
		pids, scans, burst, inside.PIDs, inside.Scans)
}

func testListableNames(t *testing.T, a *hostileAgent) {
	token := randomHex(t, 8)
	script := `echo "pid=$$"
echo ready
` + waitForTrigger(1)
	tr := newTrigger(t)
	var ids, pids []string
	for _, suffix := range []string{"a", "b", "c"} {
		name := "tenant-" + token + "-" + suffix
		install(t, a.c, fn{Name: name, Script: script})
		id, out := startWaiting(t, a.c, name, string(tr))
		ids, pids = append(ids, id), append(pids, outputValue(out, "pid"))
	}
	needles := append(slices.Clone(ids), token)
	defer finish(t, a.c, tr, ids...)

	var parents []string
	for dir := filepath.Dir(a.AppsDir); ; dir = filepath.Dir(dir) {
		parents = append(parents, dir)
		if dir == "/" {
			break
		}
	}
	listing := `find /sys/fs/cgroup -type d 2>/dev/null
find ` + shq(a.Scratch) + ` 2>/dev/null
ls -a /tmp /var/tmp /dev/shm /run 2>/dev/null
ls -aR /run/flux-agent 2>/dev/null
`
	for _, p := range parents {
		listing += "ls -a " + shq(p) + "\n"
	}
	views := map[string]string{}

	// As root, the most anyone can list.
	var root strings.Builder
	filepath.WalkDir("/sys/fs/cgroup", func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			root.WriteString(path + "\n")
		}
		return nil
	})
	for _, pid := range pids {
		b, _ := os.ReadFile("/proc/" + pid + "/cgroup") // anyone may read it
		root.Write(b)
	}
	out, err := exec.Command("sh", "-c", listing).CombinedOutput()
	if err != nil {
		t.Fatalf("listing as root: %v", err)
	}
	root.Write(out)
	views["root"] = root.String()

	// As the runner, another user of the node.
	runner, err := user.Lookup("flux-runner")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.ParseUint(runner.Uid, 10, 32)
	gid, _ := strconv.ParseUint(runner.Gid, 10, 32)
	cmd := exec.Command("sh", "-c", listing)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("listing as flux-runner: %v", err)
	}
	views["flux-runner"] = string(out)

	// As another function.
	install(t, a.c, fn{Name: "lister", Script: listing})
	views["a function"] = runOK(t, a.c, "lister")

	for who, view := range views {
		if !strings.Contains(view, "/sys/fs/cgroup") {
			t.Errorf("%s listed nothing of /sys/fs/cgroup: the check proves nothing", who)
		}
		for _, line := range strings.Split(view, "\n") {
			for _, n := range needles {
				if strings.Contains(line, n) {
					t.Errorf("%s can list %q, which names a running execution or its function", who, line)
				}
			}
		}
	}
	t.Logf("listed as root (%d lines), flux-runner (%d) and a function (%d): no execution id or function name",
		strings.Count(views["root"], "\n"), strings.Count(views["flux-runner"], "\n"), strings.Count(views["a function"], "\n"))

	// Known and out of this check's scope, reported for the record.
	if entries, err := os.ReadDir(a.AppsDir); err == nil && len(entries) > 0 {
		t.Logf("note: the apps dir %s, readable by functions, lists function names (%d entries)", a.AppsDir, len(entries))
	}
	if b, err := os.ReadFile("/proc/" + pids[0] + "/cmdline"); err == nil && strings.Contains(string(b), token) {
		t.Logf("note: a function's /proc/PID/cmdline on the host names its function (%q): hidden from functions (hidepid), not from other host users",
			strings.ReplaceAll(string(b), "\x00", " "))
	}
}

func testAdminSocket(t *testing.T, a *hostileAgent, socket string) {
	if _, err := os.Stat(socket); err != nil {
		t.Fatalf("admin.socket is set to %s but the agent serves nothing there: %v", socket, err)
	}
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("control: root cannot connect to the admin socket: %v", err)
	}
	conn.Close()
	install(t, a.c, fn{Name: "admin", Script: "exec " + shq(a.h.probe) + " " + probeCommand + " net \"$@\"\n"})
	target := netTarget{proto: "unix", kind: "connect", addr: socket}
	results := parseProbe(t, runOK(t, a.c, "admin", target.String()))
	if r, ok := results[target.String()]; !ok || r.OK {
		t.Errorf("a function connected to the agent's admin socket: %+v", r)
	}
}
