package telemetry

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// grpcLimited is a real gRPC server (the health service) behind the
// connection limiter, on loopback.
type grpcLimited struct {
	addr    string
	limiter *connLimiter
}

func serveLimitedGRPC(t *testing.T, limits ConnLimits) *grpcLimited {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis, connStats := LimitGRPCConns(inner, limits, nil)
	server := grpc.NewServer(grpc.StatsHandler(connStats))
	healthpb.RegisterHealthServer(server, health.NewServer())
	served := make(chan struct{})
	go func() {
		defer close(served)
		server.Serve(lis)
	}()
	t.Cleanup(func() {
		server.Stop()
		<-served
	})
	return &grpcLimited{addr: inner.Addr().String(), limiter: lis.(*connLimiter)}
}

// sourceDialer dials from the loopback address ip (all of 127/8 is local).
func sourceDialer(ip string) *net.Dialer {
	return &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
}

// serverSide is how the server names the connection c.
func serverSide(c net.Conn) connAddrs {
	return addrsOf(c.LocalAddr(), c.RemoteAddr())
}

// stageOf is the stage the limiter has c at; ok is false while c is not
// counted (not accepted yet, or closed).
func (g *grpcLimited) stageOf(addrs connAddrs) (stage connStage, busy, ok bool) {
	g.limiter.mu.Lock()
	defer g.limiter.mu.Unlock()
	lc := g.limiter.byAddr[addrs]
	if lc == nil {
		return 0, false, false
	}
	return lc.stage, lc.busy > 0, true
}

func (g *grpcLimited) waitStage(t *testing.T, addrs connAddrs, want connStage) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		stage, _, ok := g.stageOf(addrs)
		if ok && stage == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connection %v: stage %d (counted: %v), want %d", addrs, stage, ok, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// rawConn opens a TCP connection from ip and waits until the limiter
// counts it; with preface it also sends the HTTP/2 preface, finishing its
// handshake without making a call.
func (g *grpcLimited) rawConn(t *testing.T, ip string, preface bool) net.Conn {
	t.Helper()
	c, err := sourceDialer(ip).Dial("tcp", g.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	g.waitStage(t, serverSide(c), stageNew)
	if preface {
		// The client preface, then an empty SETTINGS frame.
		if _, err := c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// used is a gRPC client from ip that has made a call.
func (g *grpcLimited) used(t *testing.T, ip string, dials *atomic.Int32) healthpb.HealthClient {
	t.Helper()
	c, conn := g.client(t, ip, dials)
	check(t, c)
	g.waitStage(t, serverSide(*conn), stageUsed)
	return c
}

// client is a gRPC client connecting from ip; dials counts its connections.
func (g *grpcLimited) client(t *testing.T, ip string, dials *atomic.Int32) (healthpb.HealthClient, *net.Conn) {
	t.Helper()
	last := new(net.Conn)
	conn, err := grpc.NewClient(g.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			dials.Add(1)
			c, err := sourceDialer(ip).DialContext(ctx, "tcp", addr)
			*last = c
			return c, err
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return healthpb.NewHealthClient(conn), last
}

func (l *connLimiter) openConns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// closedWithin reads c until the server closes it (true) or wait passes
// (false), discarding what the server sends meanwhile (its SETTINGS).
func closedWithin(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			var netErr net.Error
			return !(errors.As(err, &netErr) && netErr.Timeout())
		}
	}
}

func netipAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func check(t *testing.T, c healthpb.HealthClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

// TestGRPCEvictsConnectionsThatNeverCalledFirst: at the cap a connection
// that never made a call goes (handshake finished or not), the oldest
// first, and one that has called goes only when no other is left.
func TestGRPCEvictsConnectionsThatNeverCalledFirst(t *testing.T) {
	g := serveLimitedGRPC(t, ConnLimits{Max: 4})
	var dials atomic.Int32
	flux := g.used(t, "127.0.0.1", &dials)
	handshaken := g.rawConn(t, "127.0.0.2", true)
	silent := g.rawConn(t, "127.0.0.2", false)
	halfPreface := g.rawConn(t, "127.0.0.2", false)
	halfPreface.Write([]byte("PRI * HTTP/2.0"))
	var newest []net.Conn
	for _, ip := range []string{"127.0.0.3", "127.0.0.4", "127.0.0.5"} {
		newest = append(newest, g.rawConn(t, ip, false))
	}
	for name, c := range map[string]net.Conn{"handshaken": handshaken, "silent": silent, "half-preface": halfPreface} {
		if !closedWithin(c, 5*time.Second) {
			t.Errorf("the %s connection, older than the newcomers, was kept at the cap", name)
		}
	}
	for _, c := range newest {
		if closedWithin(c, 50*time.Millisecond) {
			t.Errorf("a newcomer was evicted while older connections waited")
		}
	}
	check(t, flux)
	if n := dials.Load(); n != 1 {
		t.Errorf("the client that called connected %d times: its connection was evicted", n)
	}
	if open := g.limiter.openConns(); open != 4 {
		t.Errorf("%d connections open, want the cap, 4", open)
	}
}

// TestGRPCEvictsUsedConnectionsLast: with only connections that have
// called, a newcomer still gets in (the oldest goes), and the next
// newcomer evicts it rather than another that called.
func TestGRPCEvictsUsedConnectionsLast(t *testing.T) {
	g := serveLimitedGRPC(t, ConnLimits{Max: 2})
	var first, second atomic.Int32
	a := g.used(t, "127.0.0.1", &first)
	b := g.used(t, "127.0.0.2", &second)
	newcomer := g.rawConn(t, "127.0.0.3", false)
	if closedWithin(newcomer, 50*time.Millisecond) {
		t.Fatal("a newcomer was refused while idle connections could make room")
	}
	next := g.rawConn(t, "127.0.0.3", false)
	if !closedWithin(newcomer, 5*time.Second) || closedWithin(next, 50*time.Millisecond) {
		t.Error("the next newcomer did not evict the first")
	}
	check(t, b)
	check(t, a)
	if first.Load() != 2 || second.Load() != 1 {
		t.Errorf("clients connected %d and %d times, want 2 (the oldest was evicted) and 1", first.Load(), second.Load())
	}
}

// TestGRPCUsedConnectionsDoNotCountAgainstTheirSource: the source ranked
// at the cap is the one holding the most connections that never called, so
// a client's new connection is not evicted for its older, used ones.
func TestGRPCUsedConnectionsDoNotCountAgainstTheirSource(t *testing.T) {
	g := serveLimitedGRPC(t, ConnLimits{Max: 5})
	var dials atomic.Int32
	g.used(t, "127.0.0.1", &dials)
	g.used(t, "127.0.0.1", &dials)
	own := g.rawConn(t, "127.0.0.1", false) // the oldest that never called
	flood := []net.Conn{g.rawConn(t, "127.0.0.2", false), g.rawConn(t, "127.0.0.2", false)}
	g.rawConn(t, "127.0.0.3", false)
	if !closedWithin(flood[0], 5*time.Second) {
		t.Error("the oldest connection of the source holding the most unused ones was kept")
	}
	if closedWithin(own, 50*time.Millisecond) {
		t.Error("a source's new connection was evicted because of its used ones")
	}
}

// TestGRPCEvictsFromTheBiggestSource: a source at its own cap evicts its
// own connections, and at the global cap the victim comes from the source
// holding the most, even when another source's connection is older.
func TestGRPCEvictsFromTheBiggestSource(t *testing.T) {
	g := serveLimitedGRPC(t, ConnLimits{Max: 6, PerSource: 3})
	lone := g.rawConn(t, "127.0.0.4", false) // the oldest of all
	var flood []net.Conn
	for range 3 {
		flood = append(flood, g.rawConn(t, "127.0.0.2", false))
	}
	// .2 is at its cap of 3 with 4 open in all: its next one evicts its own.
	flood = append(flood, g.rawConn(t, "127.0.0.2", false))
	if !closedWithin(flood[0], 5*time.Second) {
		t.Fatal("a source past its own cap kept its oldest connection")
	}
	if open := g.limiter.openConns(); open != 4 {
		t.Errorf("%d connections open, want 4 (1 + 3)", open)
	}
	other := []net.Conn{g.rawConn(t, "127.0.0.3", false), g.rawConn(t, "127.0.0.3", false)}
	// Full (6). A newcomer from a fourth source evicts .2's oldest (3
	// connections), not the lone older connection of .4.
	g.rawConn(t, "127.0.0.5", false)
	if !closedWithin(flood[1], 5*time.Second) {
		t.Fatal("the biggest source's oldest connection was kept at the cap")
	}
	for _, c := range append(other, lone, flood[2], flood[3]) {
		if closedWithin(c, 50*time.Millisecond) {
			t.Errorf("connection from %v evicted instead of the biggest source's oldest", c.LocalAddr())
		}
	}
}

// TestGRPCNeverEvictsCallsInProgress: connections with a call in progress
// stay; a newcomer is refused then, and let in once a call ends.
func TestGRPCNeverEvictsCallsInProgress(t *testing.T) {
	g := serveLimitedGRPC(t, ConnLimits{Max: 2})
	var dials atomic.Int32
	var watches []context.CancelFunc
	for _, ip := range []string{"127.0.0.1", "127.0.0.2"} {
		c, conn := g.client(t, ip, &dials)
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		watch, err := c.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := watch.Recv(); err != nil { // the call is running
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for _, busy, _ := g.stageOf(serverSide(*conn)); !busy; _, busy, _ = g.stageOf(serverSide(*conn)) {
			if time.Now().After(deadline) {
				t.Fatal("a connection with a call in progress is not counted busy")
			}
			time.Sleep(time.Millisecond)
		}
		watches = append(watches, cancel)
	}
	c, err := sourceDialer("127.0.0.3").Dial("tcp", g.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !closedWithin(c, 5*time.Second) {
		t.Fatal("a third connection was kept while both others have calls in progress")
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("clients connected %d times, want 2: a connection with a call was evicted", n)
	}
	watches[0]()
	// The first connection is idle now (used): a newcomer evicts it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := sourceDialer("127.0.0.3").Dial("tcp", g.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if !closedWithin(c, 100*time.Millisecond) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no connection let in after a call ended")
		}
	}
}

// TestSourceOf groups IPv4 by address and IPv6 by /64.
func TestSourceOf(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1", "::ffff:192.0.2.1"},
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff::9"},
	} {
		if sourceOf(netipAddr(t, tc.a)) != sourceOf(netipAddr(t, tc.b)) {
			t.Errorf("%s and %s are different sources", tc.a, tc.b)
		}
	}
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1", "192.0.2.2"},
		{"2001:db8:1:2::1", "2001:db8:1:3::1"},
	} {
		if sourceOf(netipAddr(t, tc.a)) == sourceOf(netipAddr(t, tc.b)) {
			t.Errorf("%s and %s are one source", tc.a, tc.b)
		}
	}
}
