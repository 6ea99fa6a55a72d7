//go:build linux

package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Network namespaces the hostile tests make: the agent's node, and the
// hosts around it. Test traffic never leaves them, and nothing of them is
// ever in the host's own namespace.

// hostileMark is in the name of everything the tests add to the host, so
// that what they leave behind can be told from other tests' work on a
// shared machine.
const hostileMark = "fxh"

// netns is a network namespace made by a test; ip netns names it.
type netns struct {
	Name string
	Path string // its nsfs file, for setns and nsenter
}

var netnsSeq atomic.Int64

// newNetns makes a network namespace with its loopback up, removed when
// the test ends (after everything started in it, which later cleanups stop
// first).
func newNetns(t testing.TB, role string) *netns {
	t.Helper()
	name := fmt.Sprintf("%s-%d-%d-%s", hostileMark, os.Getpid(), netnsSeq.Add(1), role)
	runCmd(t, "ip", "netns", "add", name)
	n := &netns{Name: name, Path: filepath.Join("/run/netns", name)}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("removing network namespace %s: %v: %s", name, err, out)
		}
	})
	n.ip(t, "link", "set", "lo", "up")
	return n
}

// ip runs ip(8) in the namespace.
func (n *netns) ip(t testing.TB, args ...string) {
	t.Helper()
	runCmd(t, "ip", append([]string{"-n", n.Name}, args...)...)
}

// command runs name in the namespace; only its network is the namespace's.
func (n *netns) command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.Path, "--", name}, args...)...)
}

// do runs f on an OS thread inside the namespace: the sockets f makes
// belong to it for their whole life.
func (n *netns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		back, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(back)
		target, err := unix.Open(n.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = unix.Setns(target, unix.CLONE_NEWNET)
		unix.Close(target)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		err = f()
		// A thread that cannot go back stays locked, and the runtime ends
		// it with this goroutine.
		if unix.Setns(back, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// listen listens inside the namespace; closed at cleanup.
func (n *netns) listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.do(func() (err error) { l, err = net.Listen(network, addr); return err }); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Name, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// listenPacket is listen for datagrams.
func (n *netns) listenPacket(t testing.TB, network, addr string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	if err := n.do(func() (err error) { c, err = net.ListenPacket(network, addr); return err }); err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, n.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dial connects from inside the namespace (addr holds an IP, never a name:
// a lookup would make its sockets on other threads).
func (n *netns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// addrs lists the namespace's addresses, as a process there sees them
// (IPv6 link-local ones with their zone).
func (n *netns) addrs(t testing.TB) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	err := n.do(func() error {
		ifaces, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, iface := range ifaces {
			addrs, err := iface.Addrs()
			if err != nil {
				return err
			}
			for _, a := range addrs {
				p, err := netip.ParsePrefix(a.String())
				if err != nil {
					return err
				}
				addr := p.Addr()
				if addr.Is6() && addr.IsLinkLocalUnicast() {
					addr = addr.WithZone(iface.Name)
				}
				out = append(out, addr)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// link joins a and b with a veth pair named aName and bName, each end up
// with its addresses (CIDRs). It is made inside a, its peer moved to b:
// never in the host's namespace. It goes with the namespaces.
func link(t testing.TB, a *netns, aName string, aAddrs []string, b *netns, bName string, bAddrs []string) {
	t.Helper()
	a.ip(t, "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	for _, end := range []struct {
		ns    *netns
		name  string
		addrs []string
	}{{a, aName, aAddrs}, {b, bName, bAddrs}} {
		for _, addr := range end.addrs {
			args := []string{"addr", "add", addr, "dev", end.name}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad") // usable at once
			}
			end.ns.ip(t, args...)
		}
		end.ns.ip(t, "link", "set", end.name, "up")
	}
}

// waitAddrsReady waits until no IPv6 address of the namespace is
// tentative (link-local ones get duplicate address detection).
func (n *netns) waitAddrsReady(t testing.TB) {
	t.Helper()
	if !waitUntil(10*time.Second, func() bool {
		out, err := exec.Command("ip", "-n", n.Name, "-6", "addr", "show", "tentative").CombinedOutput()
		return err == nil && len(strings.TrimSpace(string(out))) == 0
	}) {
		t.Fatalf("IPv6 addresses of %s still tentative", n.Name)
	}
}

func runCmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// hostState is what the tests could leave on the host: network namespaces,
// interfaces, /etc/netns files and nftables tables of the host's own
// namespace.
type hostState map[string]bool

func readHostState(t testing.TB) hostState {
	t.Helper()
	st := hostState{}
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			st["netns "+e.Name()] = true
		}
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, iface := range ifaces {
		st["link "+iface.Name] = true
	}
	filepath.WalkDir("/etc/netns", func(path string, d os.DirEntry, err error) error {
		if err == nil {
			st["file "+path] = true
		}
		return nil
	})
	conn, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := conn.ListTables()
	if err != nil {
		t.Fatalf("listing the host's nftables tables: %v", err)
	}
	for _, tb := range tables {
		st[fmt.Sprintf("nftables table %d %s", tb.Family, tb.Name)] = true
	}
	return st
}

// checkHostRestored snapshots the host now and, when the test ends (its
// other cleanups done, failed or not), fails it for anything new that
// carries marks (hostileMark, the test's agent ids). Other new entries
// are other tests' on this shared machine: logged only.
func checkHostRestored(t testing.TB, marks func() []string) {
	t.Helper()
	before := readHostState(t)
	t.Cleanup(func() {
		after := readHostState(t)
		var ours, others []string
		for k := range after {
			if before[k] {
				continue
			}
			if strings.Contains(k, hostileMark) || slices.ContainsFunc(marks(), func(m string) bool { return strings.Contains(k, m) }) {
				ours = append(ours, k)
			} else {
				others = append(others, k)
			}
		}
		slices.Sort(ours)
		slices.Sort(others)
		if len(ours) > 0 {
			t.Errorf("left on the host: %s", strings.Join(ours, "; "))
		}
		if len(others) > 0 {
			t.Logf("new on the host meanwhile, not this test's: %s", strings.Join(others, "; "))
		}
	})
}

// datagrams records what a UDP socket receives, for tests that must prove
// a datagram did or did not arrive.
type datagrams struct {
	mu   sync.Mutex
	seen map[string]bool
	got  chan struct{} // signalled on every datagram
}

func recordDatagrams(t testing.TB, c net.PacketConn) *datagrams {
	d := &datagrams{seen: map[string]bool{}, got: make(chan struct{}, 1)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			d.mu.Lock()
			d.seen[string(buf[:n])] = true
			d.mu.Unlock()
			select {
			case d.got <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return d
}

func (d *datagrams) has(token string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.seen[token]
}

// serveBanner answers every connection with banner and a newline, then
// closes it.
func serveBanner(t testing.TB, l net.Listener, banner string) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintln(c, banner)
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
}

// readBanner connects from inside n and reads the first line.
func readBanner(n *netns, network, addr string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := n.dial(ctx, network, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// serveDNS answers A and AAAA questions for the names in answers (lower
// case, without the final dot) and says NXDOMAIN for every other name: a
// stand-in for a node's loopback resolver (systemd-resolved's 127.0.0.53).
func serveDNS(t testing.TB, c net.PacketConn, answers map[string][]netip.Addr) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			if reply, err := dnsReply(buf[:n], answers); err == nil {
				c.WriteTo(reply, from)
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
}

// dnsReply answers a query of one question (RFC 1035 §4.1).
func dnsReply(q []byte, answers map[string][]netip.Addr) ([]byte, error) {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:]) != 1 {
		return nil, errors.New("not a query of one question")
	}
	var labels []string
	i := 12
	for {
		if i >= len(q) {
			return nil, errors.New("truncated name")
		}
		l := int(q[i])
		i++
		if l == 0 {
			break
		}
		if l > 63 || i+l > len(q) {
			return nil, errors.New("bad label")
		}
		labels = append(labels, string(q[i:i+l]))
		i += l
	}
	if i+4 > len(q) {
		return nil, errors.New("truncated question")
	}
	qtype := binary.BigEndian.Uint16(q[i:])
	question := q[12 : i+4]
	addrs, known := answers[strings.ToLower(strings.Join(labels, "."))]

	reply := make([]byte, 12, 512)
	copy(reply, q[:2])                                            // id
	flags := uint16(0x8000 | 0x0400 | uint16(q[2]&1)<<8 | 0x0080) // QR AA RD RA
	if !known {
		flags |= 3 // NXDOMAIN
	}
	binary.BigEndian.PutUint16(reply[2:], flags)
	binary.BigEndian.PutUint16(reply[4:], 1)
	reply = append(reply, question...)
	count := 0
	for _, a := range addrs {
		if (qtype == 1 && a.Is4()) || (qtype == 28 && a.Is6()) {
			reply = append(reply, 0xc0, 12) // the question's name
			reply = binary.BigEndian.AppendUint16(reply, qtype)
			reply = binary.BigEndian.AppendUint16(reply, 1) // IN
			reply = binary.BigEndian.AppendUint32(reply, 60)
			reply = binary.BigEndian.AppendUint16(reply, uint16(len(a.AsSlice())))
			reply = append(reply, a.AsSlice()...)
			count++
		}
	}
	binary.BigEndian.PutUint16(reply[6:], uint16(count))
	return reply, nil
}
