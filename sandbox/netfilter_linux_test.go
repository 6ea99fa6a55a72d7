package sandbox

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// netfilterChildEnv makes the test binary act as a process inside a test
// network namespace: "probe" tries connections, "open-filter" opens a
// filter and waits to be killed.
const netfilterChildEnv = "FLUX_NETFILTER_TEST_CHILD"

func init() {
	// Before TestMain: these children never run tests.
	switch os.Getenv(netfilterChildEnv) {
	case "":
	case "probe":
		os.Exit(runProbeChild(os.Args[1:]))
	case "open-filter":
		os.Exit(runOpenFilterChild(os.Args[1:]))
	default:
		fmt.Fprintln(os.Stderr, "unknown", netfilterChildEnv)
		os.Exit(2)
	}
}

// The test network: a "node" namespace (the agent's host) with a veth to a
// "peer" namespace (another host). Every listener answers on every address
// of its namespace.
const (
	testPort      = 7000 // TCP and UDP on node and peer
	testAllowPort = 7001 // TCP and UDP on the node, opened by an exception
	testDNSPort   = 53   // TCP and UDP on the node
)

var (
	nodeAddrs = []string{"10.250.0.1/24", "fd00:250::1/64", "169.254.1.1/16"}
	peerAddrs = []string{"10.250.0.2/24", "10.250.0.3/24", "10.250.0.4/24", "fd00:250::2/64", "fd00:250::3/64", "fd00:250::4/64", "169.254.1.2/16", "fe80::2/64"}
	// testUIDs is the functions' range; testOtherUID is just past it.
	testUIDs     = UIDRange{First: 2_000_000_000, Count: 8}
	testOtherUID = testUIDs.First + testUIDs.Count
)

type testNet struct {
	node, peer *os.File // the namespaces
	nodeName   string
	veth       string // the node's end
}

var testNetCount atomic.Int32

// requireNetfilter skips unless the test can build network namespaces
// (root, iproute2) and nf_tables works in them.
func requireNetfilter(t testing.TB) *testNet {
	t.Helper()
	if os.Geteuid() != 0 {
		skipTB(t, "root", "needs root")
	}
	// iproute2's ip: busybox's (the cgroup v2 VM's) has no netns.
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		first, _, _ := strings.Cut(string(out), "\n")
		skipTB(t, "nftables", "needs iproute2's ip to build network namespaces: ip netns list: %v: %s", err, first)
	}
	n := newTestNet(t)
	c, err := nftables.New(nftables.WithNetNSFd(int(n.node.Fd())))
	if err == nil {
		_, err = c.ListTables()
	}
	if err != nil {
		skipTB(t, "nftables", "nf_tables unusable in a network namespace: %v", err)
	}
	return n
}

// skipTB is skip for tests and benchmarks alike.
func skipTB(t testing.TB, need, format string, args ...any) {
	t.Helper()
	if required(need) {
		t.Fatalf("%s=%s, but: %s", requiredEnv, os.Getenv(requiredEnv), fmt.Sprintf(format, args...))
	}
	t.Skipf(format, args...)
}

// testNetPrefix starts the names of the test's namespaces; the pid follows,
// so that a later run can remove what a killed one left.
const testNetPrefix = "fluxnf-"

var sweepTestNets sync.Once

func newTestNet(t testing.TB) *testNet {
	t.Helper()
	sweepTestNets.Do(removeStaleTestNets)
	id := fmt.Sprintf("%s%d-%d", testNetPrefix, os.Getpid(), testNetCount.Add(1))
	// Each namespace is new: the veth names need no uniqueness.
	n := &testNet{nodeName: id + "-node", veth: "vnode"}
	peerName, peerVeth := id+"-peer", "vpeer"
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	for _, ns := range []string{n.nodeName, peerName} {
		ip("netns", "add", ns)
		t.Cleanup(func() {
			// Deleting a namespace deletes the veth end in it, and the
			// other end with it.
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v\n%s", ns, err, out)
			}
		})
		ip("-n", ns, "link", "set", "lo", "up")
	}
	ip("-n", n.nodeName, "link", "add", n.veth, "type", "veth", "peer", "name", peerVeth, "netns", peerName)
	for _, a := range nodeAddrs {
		ip("-n", n.nodeName, "addr", "add", a, "dev", n.veth, "nodad")
	}
	ip("-n", n.nodeName, "addr", "add", "169.254.169.254/32", "dev", "lo")
	for _, a := range peerAddrs {
		ip("-n", peerName, "addr", "add", a, "dev", peerVeth, "nodad")
	}
	ip("-n", n.nodeName, "link", "set", n.veth, "up")
	ip("-n", peerName, "link", "set", peerVeth, "up")
	var err error
	if n.node, err = os.Open("/run/netns/" + n.nodeName); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.node.Close() })
	if n.peer, err = os.Open("/run/netns/" + peerName); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.peer.Close() })
	return n
}

// removeStaleTestNets deletes the namespaces of test runs that were killed
// before their cleanup.
func removeStaleTestNets() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), testNetPrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || unix.Kill(pid, 0) != unix.ESRCH {
			continue
		}
		exec.Command("ip", "netns", "del", e.Name()).Run()
	}
}

// serve answers TCP ("ok", then close) and UDP (an echo) on port in every
// address of namespace ns, until the test ends.
func serve(t testing.TB, ns *os.File, port int) {
	t.Helper()
	var ln net.Listener
	var pc net.PacketConn
	err := inNetNS(int(ns.Fd()), func() (err error) {
		addr := net.JoinHostPort("::", strconv.Itoa(port))
		if ln, err = net.Listen("tcp", addr); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		pc.Close()
		wg.Wait()
	})
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
}

// probeResult is what the probe child found for one target.
type probeResult struct {
	Target string
	Result string // "ok", "refused", "timeout", "error"
	Errno  string
	Millis float64
}

// runChildIn starts the test binary as uid inside namespace ns and returns
// its command, started.
func runChildIn(t testing.TB, ns *os.File, uid uint32, mode string, args ...string) *exec.Cmd {
	t.Helper()
	// /proc/self/exe is the test binary from inside the child too, which
	// spares copying it where another uid can reach it.
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Env = []string{netfilterChildEnv + "=" + mode}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd
}

// probeAs runs the probe child as uid in the node namespace against
// targets ("tcp 127.0.0.1:7000") and returns its results in order.
func probeAs(t *testing.T, n *testNet, uid uint32, targets []string) []probeResult {
	t.Helper()
	cmd := runChildIn(t, n.node, uid, "probe", targets...)
	var out, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := inNetNS(int(n.node.Fd()), cmd.Start); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("probe child: %v\n%s", err, stderr.String())
	}
	var results []probeResult
	dec := json.NewDecoder(strings.NewReader(out.String()))
	for {
		var r probeResult
		if err := dec.Decode(&r); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("probe output: %v\n%s", err, out.String())
		}
		results = append(results, r)
	}
	if len(results) != len(targets) {
		t.Fatalf("probe answered %d of %d targets:\n%s\n%s", len(results), len(targets), out.String(), stderr.String())
	}
	return results
}

// runProbeChild tries each target ("network address") and prints one JSON
// result per line. Networks: tcp, udp; tcp6m and udp6m for an IPv4-mapped
// address on an IPv6 socket (what Go's net refuses to do); icmp and icmp6
// for an echo from an unprivileged ping socket.
func runProbeChild(targets []string) int {
	enc := json.NewEncoder(os.Stdout)
	for _, target := range targets {
		network, addr, _ := strings.Cut(target, " ")
		start := time.Now()
		var err error
		switch network {
		case "tcp", "udp":
			err = probeNet(network, addr)
		case "tcp6m", "udp6m":
			err = probeMapped(network, addr)
		case "icmp", "icmp6":
			err = probePing(network, addr)
		default:
			err = fmt.Errorf("unknown network %q", network)
		}
		r := probeResult{Target: target, Result: "ok", Millis: float64(time.Since(start).Microseconds()) / 1000}
		var errno syscall.Errno
		switch {
		case err == nil:
		case errors.As(err, &errno):
			r.Result, r.Errno = "refused", unix.ErrnoName(errno)
		case errors.Is(err, os.ErrDeadlineExceeded):
			r.Result = "timeout"
		default:
			r.Result, r.Errno = "error", err.Error()
		}
		enc.Encode(r)
	}
	return 0
}

const probeTimeout = 3 * time.Second

func probeNet(network, addr string) error {
	if network == "udp" {
		return probeUDP(addr)
	}
	c, err := net.DialTimeout(network, addr, probeTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeTimeout))
	_, err = c.Read(make([]byte, 16))
	return err
}

// probeUDP sends from an unconnected socket, so that the echo counts from
// whichever address the server answers (a wildcard socket answers from
// the interface's first one), and broadcasts are allowed.
func probeUDP(addr string) error {
	to, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	network := "udp4"
	if to.IP.To4() == nil {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1) })
		return errors.Join(err, serr)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, "")
	if err != nil {
		return err
	}
	defer pc.Close()
	if _, err := pc.WriteTo([]byte("ping"), to); err != nil {
		return err
	}
	pc.SetReadDeadline(time.Now().Add(probeTimeout))
	_, _, err = pc.ReadFrom(make([]byte, 16))
	return err
}

func probeMapped(network, addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return err
	}
	typ := unix.SOCK_STREAM
	if network == "udp6m" {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(unix.AF_INET6, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(probeTimeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Connect(fd, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}); err != nil {
		return err
	}
	if typ == unix.SOCK_DGRAM {
		if _, err := unix.Write(fd, []byte("ping")); err != nil {
			return err
		}
	}
	if _, err := unix.Read(fd, make([]byte, 16)); err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return os.ErrDeadlineExceeded
		}
		return err
	}
	return nil
}

func probePing(network, addr string) error {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return err
	}
	family, proto, sa, echo := unix.AF_INET6, unix.IPPROTO_ICMPV6, unix.Sockaddr(&unix.SockaddrInet6{Addr: a.As16()}), byte(128)
	if network == "icmp" {
		family, proto, sa, echo = unix.AF_INET, unix.IPPROTO_ICMP, &unix.SockaddrInet4{Addr: a.As4()}, 8
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return fmt.Errorf("ping socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(probeTimeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	// As ping does: ICMP errors answering the echo fail the receive.
	if family == unix.AF_INET6 {
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
	} else {
		unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_RECVERR, 1)
	}
	// The kernel sets the identifier and the checksum.
	if err := unix.Sendto(fd, []byte{echo, 0, 0, 0, 0, 0, 0, 1, 'p', 'i', 'n', 'g'}, 0, sa); err != nil {
		return err
	}
	if _, _, err := unix.Recvfrom(fd, make([]byte, 64), 0); err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return os.ErrDeadlineExceeded
		}
		return err
	}
	return nil
}

// runOpenFilterChild opens a filter in its own namespace (args: table),
// says "ready", and waits for stdin to close or to be killed (a crash).
func runOpenFilterChild(args []string) int {
	f, err := openNetworkFilter(context.Background(), networkFilterOptions{
		Table:  args[0],
		UIDs:   testUIDs,
		Policy: NetworkPolicy{Mode: NetworkFiltered, ResolvConf: os.DevNull},
	})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	f.Close()
	return 0
}

// reportLog collects OnBlocked's reports.
type reportLog struct {
	mu      sync.Mutex
	reports []BlockedConnection
}

func (l *reportLog) add(b BlockedConnection) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reports = append(l.reports, b)
}

func (l *reportLog) of(uid uint32) []BlockedConnection {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []BlockedConnection
	for _, r := range l.reports {
		if r.UID == uid {
			out = append(out, r)
		}
	}
	return out
}

func openTestFilter(t testing.TB, n *testNet, opts networkFilterOptions) *networkFilter {
	t.Helper()
	opts.netnsFD = int(n.node.Fd())
	if opts.Table == "" {
		opts.Table = "flux-agent-test"
	}
	if opts.UIDs.Count == 0 {
		opts.UIDs = testUIDs
	}
	opts.Policy.Mode = NetworkFiltered
	if opts.Policy.ResolvConf == "" {
		opts.Policy.ResolvConf = os.DevNull
	}
	f, err := openNetworkFilter(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	return f
}

// writeResolvConf writes a resolv.conf naming servers and returns its path.
func writeResolvConf(t *testing.T, servers ...string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("# written by the test\nsearch example.internal\n")
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	path := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustExceptions(t *testing.T, specs ...string) []NetworkException {
	t.Helper()
	var out []NetworkException
	for _, s := range specs {
		e, err := ParseNetworkException(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// TestNetworkFilterPolicy tries, from a function's uid inside the node,
// every destination the policy refuses and every one it lets through, and
// the same from a uid outside the range as the control: each refused
// destination is reachable for the control, so the refusal is the
// filter's.
func TestNetworkFilterPolicy(t *testing.T) {
	n := requireNetfilter(t)
	for _, port := range []int{testPort, testAllowPort, testDNSPort} {
		serve(t, n.node, port)
	}
	serve(t, n.peer, testPort)
	// Unprivileged ping sockets for every uid, so that functions can try
	// ICMP.
	err := inNetNS(int(n.node.Fd()), func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 2147483647"), 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	var log reportLog
	f := openTestFilter(t, n, networkFilterOptions{
		Policy: NetworkPolicy{
			Deny:       []netip.Prefix{netip.MustParsePrefix("10.250.0.4/32"), netip.MustParsePrefix("fd00:250::4/128")},
			Allow:      mustExceptions(t, "127.0.0.1:7001", "[::1]:7001"),
			ResolvConf: writeResolvConf(t, "127.0.0.53", "::1"),
			Protected: func(context.Context) ([]netip.Addr, error) {
				return []netip.Addr{netip.MustParseAddr("10.250.0.3"), netip.MustParseAddr("fd00:250::3")}, nil
			},
		},
		OnBlocked: log.add,
	})

	type target struct {
		probe    string
		reported string // the destination on the wire, when it differs
	}
	var refused, allowed []target
	both := func(list *[]target, addr string) {
		*list = append(*list, target{probe: "tcp " + addr}, target{probe: "udp " + addr})
	}
	for _, a := range []string{
		"127.0.0.1:7000", "127.0.0.2:7000", "[::1]:7000", // loopback
		"10.250.0.1:7000", "[fd00:250::1]:7000", "169.254.1.1:7000", // the node's own addresses
		"169.254.169.254:7000",                  // metadata, on the node
		"169.254.1.2:7000",                      // link-local, another host
		"10.250.0.3:7000", "[fd00:250::3]:7000", // protected (Redis)
		"10.250.0.4:7000", "[fd00:250::4]:7000", // denied by the operator
		"127.0.0.53:7000", "127.0.0.1:53", "127.0.0.2:7001", // next to the exceptions
	} {
		both(&refused, a)
	}
	refused = append(refused,
		target{"tcp [fe80::2%" + n.veth + "]:7000", "[fe80::2]:7000"}, // link-local IPv6, another host
		target{"udp [fe80::2%" + n.veth + "]:7000", "[fe80::2]:7000"},
		target{"tcp 0.0.0.0:7000", "127.0.0.1:7000"}, // "this host" is loopback
		target{"tcp6m [::ffff:127.0.0.1]:7000", "127.0.0.1:7000"},
		target{"udp6m [::ffff:127.0.0.1]:7000", "127.0.0.1:7000"},
		target{"tcp6m [::ffff:10.250.0.3]:7000", "10.250.0.3:7000"},
		target{"udp 10.250.0.255:7000", ""}, // the node's subnet broadcast
		target{"icmp 127.0.0.1", "127.0.0.1:0"},
		target{"icmp6 ::1", "[::1]:0"},
		target{"icmp 169.254.169.254", "169.254.169.254:0"},
	)
	for _, a := range []string{
		"10.250.0.2:7000", "[fd00:250::2]:7000", // another host
		"127.0.0.1:7001", "[::1]:7001", // the operator's exceptions
		"127.0.0.53:53", "[::1]:53", // the loopback nameservers
	} {
		both(&allowed, a)
	}
	allowed = append(allowed, target{probe: "icmp 10.250.0.2"}, target{probe: "icmp6 fd00:250::2"})
	var targets []string
	for _, list := range [][]target{refused, allowed} {
		for _, tg := range list {
			targets = append(targets, tg.probe)
		}
	}

	// The control first: every target answers a uid outside the range (the
	// first IPv6 contact over the veth takes a second here, filter or not).
	t.Run("other-uid", func(t *testing.T) {
		for _, r := range probeAs(t, n, testOtherUID, targets) {
			if r.Result != "ok" {
				t.Errorf("%s: %s %s after %.1f ms; a uid outside the range must reach everything", r.Target, r.Result, r.Errno, r.Millis)
			}
		}
		if got := log.of(testOtherUID); len(got) != 0 {
			t.Errorf("reports for a uid outside the range: %v", got)
		}
	})
	t.Run("function", func(t *testing.T) {
		uid := testUIDs.First + 3
		results := probeAs(t, n, uid, targets)
		for i, r := range results {
			if i >= len(refused) {
				if r.Result != "ok" {
					t.Errorf("%s: %s %s after %.1f ms, want it reached", r.Target, r.Result, r.Errno, r.Millis)
				}
				continue
			}
			// Fast and explicit: TCP is reset, anything else fails to send,
			// but for an ICMPv6 echo, whose send the kernel lets succeed:
			// the ICMPv6 error answering it fails the receive.
			want := "EPERM"
			switch {
			case strings.HasPrefix(r.Target, "tcp"):
				want = "ECONNREFUSED"
			case strings.HasPrefix(r.Target, "icmp6"):
				want = "EACCES"
			}
			if r.Result != "refused" || r.Errno != want || r.Millis > 1000 {
				t.Errorf("%s: %s %s after %.1f ms, want refused with %s within 1 s", r.Target, r.Result, r.Errno, r.Millis, want)
			}
		}

		// Every refusal reported, with the uid and the destination on the
		// wire, once settle says the reports are in.
		if _, err := f.settle(context.Background(), uid); err != nil {
			t.Fatal(err)
		}
		var want []BlockedConnection
		for _, tg := range refused {
			network, addr, _ := strings.Cut(tg.probe, " ")
			if tg.reported != "" {
				addr = tg.reported
			}
			ap := netip.MustParseAddrPort(addr)
			proto := map[string]string{"tcp": "tcp", "tcp6m": "tcp", "udp": "udp", "udp6m": "udp", "icmp": "icmp", "icmp6": "icmpv6"}[network]
			want = append(want, BlockedConnection{UID: uid, Destination: netip.AddrPortFrom(ap.Addr().WithZone(""), ap.Port()), Protocol: proto})
		}
		if diff := cmp.Diff(want, log.of(uid), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
			t.Errorf("reports (-want +got):\n%s", diff)
		}
	})
}

// dialAs connects (TCP) or sends (UDP) to addr from a socket the node
// namespace's uid owns: setfsuid on a locked thread that then dies, so the
// test needs no process per attempt.
func dialAs(n *testNet, uid uint32, network, addr string) error {
	return inNetNS(int(n.node.Fd()), func() error {
		if err := unix.Setfsuid(int(uid)); err != nil {
			return err
		}
		c, err := net.DialTimeout(network, addr, probeTimeout)
		if err != nil {
			return err
		}
		defer c.Close()
		if network == "udp" {
			_, err = c.Write([]byte("ping"))
		}
		return err
	})
}

// TestNetworkFilterProtectedRefresh moves the protected addresses to the
// peer: it is refused once the refresh ran, still refused while
// Protected fails, and reachable again once Protected moves them away.
func TestNetworkFilterProtectedRefresh(t *testing.T) {
	n := requireNetfilter(t)
	serve(t, n.peer, testPort)
	var protected atomic.Pointer[[]netip.Addr]
	var failing atomic.Bool
	var calls atomic.Int64
	setProtected := func(addrs ...string) {
		var list []netip.Addr
		for _, a := range addrs {
			list = append(list, netip.MustParseAddr(a))
		}
		protected.Store(&list)
	}
	setProtected("10.250.0.3")
	openTestFilter(t, n, networkFilterOptions{
		Refresh: 20 * time.Millisecond,
		Policy: NetworkPolicy{Protected: func(context.Context) ([]netip.Addr, error) {
			calls.Add(1)
			if failing.Load() {
				return nil, errors.New("redis: lookup failed")
			}
			return *protected.Load(), nil
		}},
	})
	uid := testUIDs.First
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for: %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	refused := func(addr string) bool { return errors.Is(dialAs(n, uid, "tcp", addr), unix.ECONNREFUSED) }

	if err := dialAs(n, uid, "tcp", "10.250.0.2:7000"); err != nil {
		t.Fatalf("the peer before it is protected: %v", err)
	}
	if !refused("10.250.0.3:7000") {
		t.Fatal("the protected address is reachable")
	}
	setProtected("10.250.0.2", "fd00:250::2")
	waitFor("the peer refused after the refresh", func() bool { return refused("10.250.0.2:7000") && refused("[fd00:250::2]:7000") })
	if refused("10.250.0.3:7000") {
		t.Error("an address no longer protected is still refused")
	}

	failing.Store(true)
	since := calls.Load()
	waitFor("three failed refreshes", func() bool { return calls.Load() >= since+3 })
	if !refused("10.250.0.2:7000") {
		t.Error("a failing Protected dropped the previous addresses")
	}

	failing.Store(false)
	setProtected("10.250.0.3")
	waitFor("the peer reachable again", func() bool { return dialAs(n, uid, "tcp", "10.250.0.2:7000") == nil })
}

// TestNetworkFilterFlood floods refused datagrams from one uid: the kernel
// reports a bounded number, and settle accounts for every other one.
func TestNetworkFilterFlood(t *testing.T) {
	n := requireNetfilter(t)
	var reports atomic.Int64
	f := openTestFilter(t, n, networkFilterOptions{OnBlocked: func(BlockedConnection) { reports.Add(1) }})
	uid := testUIDs.First + 1
	const attempts = 2000
	start := time.Now()
	var refused int
	err := inNetNS(int(n.node.Fd()), func() error {
		if err := unix.Setfsuid(int(uid)); err != nil {
			return err
		}
		c, err := net.Dial("udp", "127.0.0.1:7000")
		if err != nil {
			return err
		}
		defer c.Close()
		for range attempts {
			if _, err := c.Write([]byte("x")); errors.Is(err, unix.EPERM) {
				refused++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	if refused != attempts {
		t.Fatalf("%d of %d datagrams refused", refused, attempts)
	}
	// The slow path of settle, whether or not reports are still queued.
	if err := f.drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	suppressed, err := f.settle(context.Background(), uid)
	if err != nil {
		t.Fatal(err)
	}
	got := reports.Load()
	limit := int64(reportBurst + reportRate*elapsed.Seconds() + 2)
	t.Logf("%d attempts in %v: %d reported, %d suppressed", attempts, elapsed, got, suppressed)
	if got < reportBurst || got > limit {
		t.Errorf("%d reports, want %d to %d (burst %d, %d/s)", got, reportBurst, limit, reportBurst, reportRate)
	}
	if got+int64(suppressed) != attempts {
		t.Errorf("%d reported + %d suppressed != %d attempts", got, suppressed, attempts)
	}
	// The count restarts with the next execution on this uid.
	if again, err := f.settle(context.Background(), uid); err != nil || again != 0 {
		t.Errorf("second settle: %d, %v; want 0", again, err)
	}
}

// nftState lists the tables of the node namespace and, for table, the
// number of rules per chain.
func nftState(t *testing.T, n *testNet, table string) (tables []string, rules map[string]int) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(n.node.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	all, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	rules = map[string]int{}
	for _, tb := range all {
		tables = append(tables, tb.Name)
		if tb.Name != table {
			continue
		}
		chains, err := c.ListChainsOfTableFamily(tb.Family)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range chains {
			if ch.Table.Name != table {
				continue
			}
			rs, err := c.GetRules(tb, ch)
			if err != nil {
				t.Fatal(err)
			}
			rules[ch.Name] = len(rs)
		}
	}
	slices.Sort(tables)
	return tables, rules
}

// addForeignTable adds a table of someone else's to the node namespace,
// and returns a check that it is still there, untouched.
func addForeignTable(t *testing.T, n *testNet) func() {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(n.node.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	tb := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "someone-else"})
	ch := c.AddChain(&nftables.Chain{Name: "theirs", Table: tb})
	c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: verdict(expr.VerdictAccept, "")})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		_, rules := nftState(t, n, "someone-else")
		if diff := cmp.Diff(map[string]int{"theirs": 1}, rules); diff != "" {
			t.Errorf("the foreign table changed (-want +got):\n%s", diff)
		}
	}
}

// TestNetworkFilterSurvivesCrash kills an agent that opened the filter:
// its rules stay in force; the next agent's open leaves exactly one table
// with one rule set; Close leaves none; a foreign table is never touched.
func TestNetworkFilterSurvivesCrash(t *testing.T) {
	n := requireNetfilter(t)
	checkForeign := addForeignTable(t, n)
	const table = "flux-agent-crash"

	cmd := runChildIn(t, n.node, 0, "open-filter", table)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := inNetNS(int(n.node.Fd()), cmd.Start); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the first agent: %q %v", line, err)
	}
	_, before := nftState(t, n, table)
	cmd.Process.Kill()
	cmd.Wait()

	uid := testUIDs.First
	serve(t, n.node, testPort)
	if err := dialAs(n, uid, "tcp", "127.0.0.1:7000"); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("after the crash, loopback: %v; want the crashed agent's rules still refusing", err)
	}

	f := openTestFilter(t, n, networkFilterOptions{Table: table})
	tables, after := nftState(t, n, table)
	if diff := cmp.Diff([]string{table, "someone-else"}, tables); diff != "" {
		t.Errorf("tables after the restart (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("rules per chain: restart vs first run (-want +got):\n%s", diff)
	}
	if err := dialAs(n, uid, "tcp", "127.0.0.1:7000"); !errors.Is(err, unix.ECONNREFUSED) {
		t.Errorf("after the restart, loopback: %v", err)
	}

	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if tables, _ := nftState(t, n, table); !slices.Equal(tables, []string{"someone-else"}) {
		t.Errorf("tables after Close: %v", tables)
	}
	if err := dialAs(n, uid, "tcp", "127.0.0.1:7000"); err != nil {
		t.Errorf("after Close, loopback: %v", err)
	}
	checkForeign()
}

// TestNetworkFilterNeedsCapNetAdmin opens the filter as a user without
// CAP_NET_ADMIN: the error names the capability and the way out.
func TestNetworkFilterNeedsCapNetAdmin(t *testing.T) {
	n := requireNetfilter(t)
	cmd := runChildIn(t, n.node, testOtherUID, "open-filter", "flux-agent-unprivileged")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := inNetNS(int(n.node.Fd()), cmd.Start); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Fatalf("opened without CAP_NET_ADMIN: %s", out.String())
	}
	for _, want := range []string{"CAP_NET_ADMIN", "sandbox.network: host"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("error %q does not mention %q", out.String(), want)
		}
	}
}

// pairedCase is one side of a paired benchmark: a namespace and the uid
// whose sockets or processes are measured there.
type pairedCase struct {
	name string
	ns   *os.File
	uid  uint32
}

// benchPaired runs op once per case per iteration, cases interleaved in a
// rotating order so that a noisy machine weighs on all alike, from one thread that moves
// between the namespaces (untimed), and reports each case's mean as
// <name>-ns/op.
func benchPaired(b *testing.B, cases []pairedCase, op func(c pairedCase) error) {
	b.Helper()
	total := make([]time.Duration, len(cases))
	err := inNetNS(int(cases[0].ns.Fd()), func() error {
		for n := range b.N {
			for k := range cases {
				// Each case first in turn: no case always follows another.
				i := (n + k) % len(cases)
				c := cases[i]
				if err := unix.Setns(int(c.ns.Fd()), unix.CLONE_NEWNET); err != nil {
					return err
				}
				if err := unix.Setfsuid(int(c.uid)); err != nil {
					return err
				}
				start := time.Now()
				if err := op(c); err != nil {
					return fmt.Errorf("%s: %w", c.name, err)
				}
				total[i] += time.Since(start)
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	for i, c := range cases {
		b.ReportMetric(float64(total[i].Nanoseconds())/float64(b.N), c.name+"-ns/op")
	}
	b.ReportMetric(0, "ns/op") // the sum of the cases says nothing
}

// BenchmarkNetworkFilterConnect is the cost of the filter to an allowed
// connection: TCP connect and close (a reset, so no TIME_WAIT piles up) to
// the peer, from a function's uid in a node without the table ("plain"),
// and in a node with it from a uid outside the range (every other process
// of the host: "other") and from a function's ("function").
func BenchmarkNetworkFilterConnect(b *testing.B) {
	plain, filtered := requireNetfilter(b), newTestNet(b)
	serve(b, plain.peer, testPort)
	serve(b, filtered.peer, testPort)
	openTestFilter(b, filtered, networkFilterOptions{
		Policy: NetworkPolicy{
			Deny:  []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/32")},
			Allow: []NetworkException{{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Port: 8125}},
			Protected: func(context.Context) ([]netip.Addr, error) {
				return []netip.Addr{netip.MustParseAddr("10.250.0.3")}, nil
			},
		},
	})
	cases := []pairedCase{{"plain", plain.node, testUIDs.First}, {"other", filtered.node, testOtherUID}, {"function", filtered.node, testUIDs.First}}
	benchPaired(b, cases, func(pairedCase) error {
		c, err := net.Dial("tcp", "10.250.0.2:7000")
		if err != nil {
			return err
		}
		c.(*net.TCPConn).SetLinger(0)
		return c.Close()
	})
}

// BenchmarkNetworkFilterSend is the filter's cost per packet: one UDP
// datagram to the peer per operation, cases as in
// BenchmarkNetworkFilterConnect.
func BenchmarkNetworkFilterSend(b *testing.B) {
	plain, filtered := requireNetfilter(b), newTestNet(b)
	openTestFilter(b, filtered, networkFilterOptions{})
	to := &unix.SockaddrInet4{Port: testPort, Addr: [4]byte{10, 250, 0, 2}}
	sockets := map[string]int{} // per case, made by its uid in its namespace
	defer func() {
		for _, fd := range sockets {
			unix.Close(fd)
		}
	}()
	cases := []pairedCase{{"plain", plain.node, testUIDs.First}, {"other", filtered.node, testOtherUID}, {"function", filtered.node, testUIDs.First}}
	benchPaired(b, cases, func(c pairedCase) error {
		fd, ok := sockets[c.name]
		if !ok {
			var err error
			if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
				return err
			}
			sockets[c.name] = fd
		}
		return unix.Sendto(fd, []byte("x"), 0, to)
	})
}

// BenchmarkNetworkFilterProcessStart is the cost of the filter to starting
// a function process (fork, exec and wait of /bin/true as a function's
// uid) in a node without the table and in one with it: none is expected,
// the filter does nothing per start.
func BenchmarkNetworkFilterProcessStart(b *testing.B) {
	plain, filtered := requireNetfilter(b), newTestNet(b)
	openTestFilter(b, filtered, networkFilterOptions{})
	cases := []pairedCase{{"plain", plain.node, 0}, {"filtered", filtered.node, 0}}
	benchPaired(b, cases, func(pairedCase) error {
		cmd := exec.Command("/bin/true")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: testUIDs.First, Gid: testUIDs.First}}
		return cmd.Run()
	})
}

// BenchmarkNetworkFilterSettle is what the end of an execution that had
// nothing refused costs: one wake-up of the report reader.
func BenchmarkNetworkFilterSettle(b *testing.B) {
	n := requireNetfilter(b)
	f := openTestFilter(b, n, networkFilterOptions{})
	for b.Loop() {
		if _, err := f.settle(context.Background(), testUIDs.First); err != nil {
			b.Fatal(err)
		}
	}
}

// logBuffer collects a logger's text output.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// waitUntil polls cond until it holds, or fails the test after 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestNetworkFilterRepairsTable changes the table the way another program
// would (an nftables reload flushing the ruleset, a rule replaced, set
// elements deleted): the filter puts it back, at once for what the kernel
// announces, within a refresh period for set elements.
func TestNetworkFilterRepairsTable(t *testing.T) {
	n := requireNetfilter(t)
	serve(t, n.node, testPort)
	serve(t, n.peer, testPort)
	uid := testUIDs.First
	refused := func(addr string) bool { return errors.Is(dialAs(n, uid, "tcp", addr), unix.ECONNREFUSED) }
	other, err := nftables.New(nftables.WithNetNSFd(int(n.node.Fd())))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("announced", func(t *testing.T) {
		const table = "flux-agent-repair"
		var log logBuffer
		f := openTestFilter(t, n, networkFilterOptions{Table: table, Refresh: time.Hour, Logger: log.logger()})
		_, want := nftState(t, n, table)

		repaired := func(times int) bool {
			return strings.Count(log.String(), "table installed again") >= times && refused("127.0.0.1:7000")
		}
		other.FlushRuleset()
		if err := other.Flush(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		waitUntil(t, "the table back after a ruleset flush", func() bool { return repaired(1) })
		t.Logf("ruleset flush repaired in %v", time.Since(start))
		if _, got := nftState(t, n, table); !maps.Equal(got, want) {
			t.Errorf("rules after the repair: %v, want %v", got, want)
		}

		rules, err := other.GetRules(f.table, &nftables.Chain{Name: "output", Table: f.table})
		if err != nil || len(rules) != 1 {
			t.Fatalf("output chain: %v, %v", rules, err)
		}
		// The same number of rules, one of them different: accept all.
		other.ReplaceRule(&nftables.Rule{Table: f.table, Chain: rules[0].Chain, Handle: rules[0].Handle, Exprs: verdict(expr.VerdictAccept, "")})
		if err := other.Flush(); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "the output chain's rule back", func() bool { return repaired(2) })
		if !strings.Contains(log.String(), "chain output: a rule changed") {
			t.Errorf("the log does not say what changed:\n%s", log.String())
		}
	})

	t.Run("elements", func(t *testing.T) {
		var log logBuffer
		f := openTestFilter(t, n, networkFilterOptions{Table: "flux-agent-repair-elements", Refresh: 20 * time.Millisecond, Logger: log.logger()})
		if !refused("169.254.1.2:7000") {
			t.Fatal("link-local reachable")
		}
		linkLocal := []nftables.SetElement{{Key: []byte{169, 254, 0, 0}}, {Key: []byte{169, 255, 0, 0}, IntervalEnd: true}}
		if err := other.SetDeleteElements(f.sets.deny[0], linkLocal); err != nil {
			t.Fatal(err)
		}
		if err := other.Flush(); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "link-local refused again", func() bool {
			return strings.Contains(log.String(), "set deny4: 7 elements, not the 9 installed") && refused("169.254.1.2:7000")
		})
	})
}

// TestNetworkFilterNFLOGGroupTaken starts the filter in a namespace where
// another program holds its first NFLOG group: it takes the next one, and
// its rules log to the group it got.
func TestNetworkFilterNFLOGGroupTaken(t *testing.T) {
	n := requireNetfilter(t)
	const table = "flux-agent-group"
	groups := nflogGroupCandidates(table)
	holder, err := openNFLOG(int(n.node.Fd()), groups[:1])
	if err != nil {
		t.Fatal(err)
	}
	defer holder.close()

	var log reportLog
	f := openTestFilter(t, n, networkFilterOptions{Table: table, OnBlocked: log.add})
	if f.nflog.group != groups[1] {
		t.Errorf("group %d, want %d (the first candidate is taken)", f.nflog.group, groups[1])
	}
	uid := testUIDs.First + 2
	if err := dialAs(n, uid, "udp", "127.0.0.1:7000"); !errors.Is(err, unix.EPERM) {
		t.Fatalf("loopback: %v", err)
	}
	if _, err := f.settle(context.Background(), uid); err != nil {
		t.Fatal(err)
	}
	want := []BlockedConnection{{UID: uid, Destination: netip.MustParseAddrPort("127.0.0.1:7000"), Protocol: "udp"}}
	if diff := cmp.Diff(want, log.of(uid), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("reports (-want +got):\n%s", diff)
	}
	// The holder's group hears nothing of this table.
	var heard int
	if _, err := holder.receive(func(uint32, string, netip.AddrPort, uint8) { heard++ }); err != nil || heard != 0 {
		t.Errorf("the other program's group got %d reports (%v)", heard, err)
	}
}

// TestNetworkFilterNodeAddressAddedLater adds an address to the node after
// the filter is installed: it is the node's, so refused, with no refresh.
func TestNetworkFilterNodeAddressAddedLater(t *testing.T) {
	n := requireNetfilter(t)
	serve(t, n.node, testPort)
	openTestFilter(t, n, networkFilterOptions{Refresh: time.Hour})
	for _, a := range []string{"10.250.0.9/24", "fd00:250::9/64"} {
		if out, err := exec.Command("ip", "-n", n.nodeName, "addr", "add", a, "dev", n.veth, "nodad").CombinedOutput(); err != nil {
			t.Fatalf("ip addr add %s: %v\n%s", a, err, out)
		}
	}
	for _, addr := range []string{"10.250.0.9:7000", "[fd00:250::9]:7000"} {
		if err := dialAs(n, testOtherUID, "tcp", addr); err != nil {
			t.Fatalf("%s from a uid outside the range: %v", addr, err)
		}
		if err := dialAs(n, testUIDs.First, "tcp", addr); !errors.Is(err, unix.ECONNREFUSED) {
			t.Errorf("%s from a function: %v, want ECONNREFUSED", addr, err)
		}
	}
}
