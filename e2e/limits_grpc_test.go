//go:build linux

package e2e

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// The agent's gRPC limits, as main.go sets them; the tests check them from
// outside.
const (
	grpcMaxConns         = 256
	grpcHandshakeTimeout = 10 * time.Second
	grpcIdleTimeout      = time.Minute
	grpcStreamHeadroom   = 256
	grpcMaxHeaderBytes   = 16 << 10
)

// Loopback sources: all of 127/8 is local, so a test can connect from
// several addresses, as clients on several hosts would.
const fluxSource = "127.0.0.1"

func attackerSource(i int) string { return fmt.Sprintf("127.0.0.%d", 2+i%10) }

func dialFrom(ctx context.Context, src, addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return d.DialContext(ctx, "tcp", addr)
}

// floodKind is what a flood connection sends before it falls silent.
type floodKind int

const (
	floodSilent         floodKind = iota // nothing: TCP connected only
	floodPartialHello                    // the start of a TLS ClientHello
	floodPartialPreface                  // the start of the HTTP/2 preface
	floodFullPreface                     // the whole preface and SETTINGS (plaintext): a finished handshake, no call
)

const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// partialClientHello is a TLS record header announcing a 512-byte
// ClientHello and the first bytes of it; the rest never comes. It is
// shorter than the HTTP/2 preface, so a plaintext server waits for more too.
var partialClientHello = []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a}

func (k floodKind) open(ctx context.Context, src, addr string) (net.Conn, error) {
	c, err := dialFrom(ctx, src, addr)
	if err != nil {
		return nil, err
	}
	var greeting []byte
	switch k {
	case floodPartialHello:
		greeting = partialClientHello
	case floodPartialPreface:
		greeting = []byte(h2Preface[:16])
	case floodFullPreface:
		greeting = append([]byte(h2Preface), 0, 0, 0, frameSettings, 0, 0, 0, 0, 0)
	}
	if len(greeting) > 0 {
		c.Write(greeting) // the agent may have closed it already
	}
	return c, nil
}

// flood holds attacker connections to the agent's gRPC port: a first wave
// that stays, and a churn that keeps opening new ones at a steady rate,
// closing its oldest, as an attacker replacing what the agent evicts would.
type flood struct {
	addr  string
	kinds []floodKind

	mu     sync.Mutex
	held   []net.Conn
	opened int
	errs   int

	stop    chan struct{}
	stopped sync.WaitGroup
}

func newFlood(addr string, kinds []floodKind) *flood {
	return &flood{addr: addr, kinds: kinds, stop: make(chan struct{})}
}

// wave opens n connections at once, from fluxSource for every fifth (the
// source Flux connects from) and from ten other addresses for the rest.
func (f *flood) wave(t *testing.T, n int) {
	t.Helper()
	for i := range n {
		src := attackerSource(i)
		if i%5 == 0 {
			src = fluxSource
		}
		c, err := f.kinds[i%len(f.kinds)].open(context.Background(), src, f.addr)
		if err != nil {
			t.Fatalf("flood connection %d: %v", i, err)
		}
		f.mu.Lock()
		f.held = append(f.held, c)
		f.opened++
		f.mu.Unlock()
	}
}

// churn opens perSecond connections a second from the other addresses
// until Close, keeping at most keep of them.
func (f *flood) churn(perSecond, keep int) {
	f.stopped.Add(1)
	go func() {
		defer f.stopped.Done()
		tick := time.NewTicker(time.Second / time.Duration(perSecond))
		defer tick.Stop()
		var ring []net.Conn
		defer func() {
			for _, c := range ring {
				c.Close()
			}
		}()
		for i := 0; ; i++ {
			select {
			case <-f.stop:
				return
			case <-tick.C:
			}
			c, err := f.kinds[i%len(f.kinds)].open(context.Background(), attackerSource(i), f.addr)
			f.mu.Lock()
			if err != nil {
				f.errs++
			} else {
				f.opened++
			}
			f.mu.Unlock()
			if err != nil {
				continue
			}
			if len(ring) < keep {
				ring = append(ring, c)
			} else {
				ring[i%keep].Close()
				ring[i%keep] = c
			}
		}
	}()
}

func (f *flood) counts() (opened, errs int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.opened, f.errs
}

// Close stops the churn and closes every connection.
func (f *flood) Close() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	f.stopped.Wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.held {
		c.Close()
	}
	f.held = nil
}

// fluxClient connects like Flux: one long-lived connection (from
// fluxSource), here also with the most frequent keepalive pings a gRPC
// client allows (every 10 s, with or without calls). dials counts the
// connections it made.
func fluxClient(t testing.TB, addr string, creds credentials.TransportCredentials) (fluxpb.AgentServiceClient, *atomic.Int32) {
	t.Helper()
	dials := new(atomic.Int32)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			dials.Add(1)
			return dialFrom(ctx, fluxSource, addr)
		}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(50<<20), grpc.MaxCallSendMsgSize(50<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return fluxpb.NewAgentServiceClient(conn), dials
}

// newClient is a client from fluxSource, closed by the returned func.
func newClient(t *testing.T, addr string, creds credentials.TransportCredentials) (fluxpb.AgentServiceClient, func()) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialFrom(ctx, fluxSource, addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	return fluxpb.NewAgentServiceClient(conn), func() { conn.Close() }
}

// healthLoop calls HealthCheck every 10 s as Flux does, until stop.
type healthLoop struct {
	calls    atomic.Int32
	failures []error // calls that failed at the transport (unhealthy is an answer)
	done     chan struct{}
	finished chan struct{}
}

func startHealthLoop(c fluxpb.AgentServiceClient) *healthLoop {
	h := &healthLoop{done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(h.finished)
		tick := time.NewTicker(10 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-h.done:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			if _, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{}); err != nil {
				h.failures = append(h.failures, err)
			}
			cancel()
			h.calls.Add(1)
		}
	}()
	return h
}

// stop ends the loop and returns its transport failures.
func (h *healthLoop) stop() []error {
	select {
	case <-h.done:
	default:
		close(h.done)
	}
	<-h.finished
	return h.failures
}

func healthy(c fluxpb.AgentServiceClient) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second) // Flux's deadline
	defer cancel()
	h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
	return h.GetHealthy(), err
}

// timedExec runs a sync execution and returns how long the call took.
func timedExec(t *testing.T, c fluxpb.AgentServiceClient, name string) (*fluxpb.ExecutionResponse, time.Duration, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: newID()})
	return resp, time.Since(start), err
}

// acceptBacklog is how many connections wait in the kernel for the agent
// to accept them on its listening address addr (IPv4), from /proc/net/tcp.
func acceptBacklog(t *testing.T, addr string) int {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("listening address %q is not IPv4", addr)
	}
	ip := ap.Addr().As4()
	// The address as the kernel prints it: little-endian hex, then the port.
	local := fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], ap.Port())
	data, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[1] == local && f[3] == "0A" { // LISTEN
			_, rx, _ := strings.Cut(f[4], ":")
			n, err := strconv.ParseInt(rx, 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return int(n)
		}
	}
	t.Fatalf("no listening socket %s in /proc/net/tcp", local)
	return 0
}

// redisPID is the redis-server's process id, as it reports it.
func redisPID(t *testing.T, rs *redisServer) int {
	t.Helper()
	info, err := rs.Client.Info(context.Background(), "server").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "process_id:"); ok {
			if pid, err := strconv.Atoi(v); err == nil {
				return pid
			}
		}
	}
	t.Fatalf("no process_id in redis INFO: %q", info)
	return 0
}

// fdHog is a function that opens files until refused (10 000 at most),
// tries to lift its own hard limit, then holds what it opened until its
// trigger (first argument) exists.
const fdHog = `exec python3 -c '
import errno, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print("limit", soft, hard, flush=True)
fds, err = [], None
try:
    for _ in range(10000):
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    err = errno.errorcode.get(e.errno, e.errno)
print("opened", len(fds), "then", err, flush=True)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * hard, 2 * hard))
    print("raised to", resource.getrlimit(resource.RLIMIT_NOFILE), flush=True)
except (ValueError, OSError) as e:
    print("raise refused:", e, flush=True)
print("holding", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
print("released", len(fds), flush=True)
' "$@"
`

// checkFdHog checks the output of a finished fdHog: it ran with the
// sandbox's default limit, was refused at it, and could not lift it.
func checkFdHog(t *testing.T, out string) {
	t.Helper()
	if !strings.Contains(out, "limit 1024 1024\n") {
		t.Errorf("function's RLIMIT_NOFILE is not 1024 soft and hard:\n%s", out)
	}
	var opened int
	var after string
	i := strings.Index(out, "opened ")
	if i < 0 {
		t.Fatalf("no count of opened files:\n%s", out)
	}
	if _, err := fmt.Sscanf(out[i:], "opened %d then %s", &opened, &after); err != nil {
		t.Fatalf("no count of opened files: %v\n%s", err, out)
	}
	// 1024 less stdin, stdout, stderr and what python holds itself.
	if after != "EMFILE" || opened < 1000 || opened > 1021 {
		t.Errorf("function opened %d files then got %s, want about 1020 then EMFILE", opened, after)
	}
	if !strings.Contains(out, "raise refused:") || strings.Contains(out, "raised to") {
		t.Errorf("function lifted its own hard limit:\n%s", out)
	}
	if !strings.Contains(out, fmt.Sprintf("released %d", opened)) {
		t.Errorf("function did not hold its files to the end:\n%s", out)
	}
}

// TestGRPCPortSurvivesConnectionFlood floods the agent's gRPC port with
// 5 000 idle and half-open connections (a fifth of them from the address
// Flux connects from) and keeps opening more, while a function opens as
// many files as it can. Meanwhile Flux's existing connection and a new one
// run executions within 1 s, HealthCheck follows Redis being stopped and
// resumed, and the agent's descriptors, goroutines and memory stay bounded.
func TestGRPCPortSurvivesConnectionFlood(t *testing.T) {
	if syscall.Geteuid() == 0 {
		requireRunner(t) // functions must run unprivileged: root could lift its limit
	}
	raiseFileLimit(t, idleFlood+4096)
	t.Run("plaintext", func(t *testing.T) {
		testGRPCFlood(t, "", insecureCreds(), []floodKind{floodSilent, floodPartialPreface, floodPartialHello, floodFullPreface})
	})
	t.Run("mTLS", func(t *testing.T) {
		pki := newFluxPKI(t)
		dir := t.TempDir()
		pki.writeAgentFiles(t, dir)
		yaml := tlsYAML(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "agent.pem"), filepath.Join(dir, "agent-key.pem"))
		testGRPCFlood(t, yaml, tlsCreds(pki.clientConfig(pki.Client.TLS)), []floodKind{floodSilent, floodPartialHello})
	})
}

func testGRPCFlood(t *testing.T, yaml string, creds credentials.TransportCredentials, kinds []floodKind) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: yaml})
	c, dials := fluxClient(t, a.Addr, creds)
	install(t, c, fn{Name: "quick", Script: "echo ok\n"})
	install(t, c, fn{Name: "fdhog", Script: fdHog})
	if resp, _ := execSync(t, c, "quick"); resp.GetError() != "" {
		t.Fatalf("execution before the flood: %q", resp.GetError())
	}
	periodic := startHealthLoop(c)
	t.Cleanup(func() { periodic.stop() })
	before := figures(t, a)

	tr := newTrigger(t)
	hog := execAsync(t, c, "fdhog", string(tr))
	t.Cleanup(func() { tr.fire(t) })

	f := newFlood(a.Addr, kinds)
	t.Cleanup(f.Close)
	start := time.Now()
	f.wave(t, idleFlood)
	opening := time.Since(start)
	const churnRate = 1000
	f.churn(churnRate, 2000)
	// The wave was connected faster than the agent accepts (the kernel
	// completes the handshakes and queues them): until the queue drains a
	// newcomer waits behind it, whatever the agent does. How long that takes
	// is reported; the checks below measure the flood once it is drained,
	// with the churn still going.
	if !waitUntil(30*time.Second, func() bool { return acceptBacklog(t, a.Addr) < 16 }) {
		t.Errorf("the agent did not accept the wave within 30s: %d still queued", acceptBacklog(t, a.Addr))
	}
	t.Logf("%d connections opened in %v; the agent had accepted them %v after the first",
		idleFlood, opening.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	waitRecord(t, c, hog, 30*time.Second, "files opened", func(r *record) bool { return strings.Contains(r.Output, "holding") })

	// (a) Flux's existing connection, and (b) a new one from the same
	// address as a fifth of the flood, while the rest keeps coming from
	// ten others.
	var slowest, slowestNew time.Duration
	for range 5 {
		resp, took, err := timedExec(t, c, "quick")
		slowest = max(slowest, took)
		if err != nil || resp.GetError() != "" || took > time.Second {
			t.Errorf("execution on Flux's connection during the flood: %v %q in %v, want success within 1s", err, resp.GetError(), took)
		}
	}
	for range 3 {
		start := time.Now()
		fresh, closeFresh := newClient(t, a.Addr, creds)
		resp, _, err := timedExec(t, fresh, "quick")
		took := time.Since(start)
		closeFresh()
		slowestNew = max(slowestNew, took)
		if err != nil || resp.GetError() != "" || took > time.Second {
			t.Errorf("execution on a new connection during the flood: %v %q in %v, want success within 1s", err, resp.GetError(), took)
		}
	}

	// (c) HealthCheck follows Redis through the flood.
	if ok, err := healthy(c); !ok || err != nil {
		t.Errorf("HealthCheck during the flood with Redis up: %v, %v; want healthy", ok, err)
	}
	pid := redisPID(t, rs)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	})
	var unhealthyAfter, healthyAfter time.Duration
	if !waitUntil(10*time.Second, func() bool { ok, err := healthy(c); return err == nil && !ok }) {
		t.Errorf("HealthCheck still healthy 10s after Redis was stopped")
	}
	unhealthyAfter = time.Since(stopped)
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true
	resumedAt := time.Now()
	if !waitUntil(10*time.Second, func() bool { ok, err := healthy(c); return err == nil && ok }) {
		t.Errorf("HealthCheck not healthy 10s after Redis resumed")
	}
	healthyAfter = time.Since(resumedAt)

	// (d) What the flood costs the agent, once Flux's periodic HealthCheck
	// has run during it.
	if !waitUntil(15*time.Second, func() bool { return periodic.calls.Load() >= 1 }) {
		t.Errorf("Flux's periodic HealthCheck did not run")
	}
	during := figures(t, a)
	opened, errs := f.counts()
	t.Logf("agent before: %v; during the flood (%d connections opened, %d failed to open): %v",
		before, opened, errs, during)
	t.Logf("slowest execution on Flux's connection %v, on a new connection (connect included) %v; unhealthy %v after Redis stopped, healthy %v after it resumed",
		slowest, slowestNew, unhealthyAfter.Round(time.Millisecond), healthyAfter.Round(time.Millisecond))
	// The table is full (the flood reached the cap) and holds no more than
	// the cap: a descriptor per connection, a few goroutines each.
	if grown := during.fds - before.fds; grown < grpcMaxConns*3/4 || grown > grpcMaxConns+32 {
		t.Errorf("agent holds %d more descriptors during the flood, want about its %d connections", grown, grpcMaxConns)
	}
	if during.goroutines > before.goroutines+3*grpcMaxConns+64 {
		t.Errorf("agent runs %.0f goroutines during the flood, %.0f before", during.goroutines, before.goroutines)
	}
	// Measured: 16-24 MiB without the race detector, 64-110 MiB with it
	// (its shadow memory, and the churn's garbage); 5 000 connections held
	// would be about 450 MiB without it.
	if grown := during.rssKiB - before.rssKiB; grown > 160<<10 {
		t.Errorf("agent RSS grew by %d MiB during the flood", grown>>10)
	}

	// The function was refused at its own limit, not at the agent's.
	tr.fire(t)
	rec := waitRecord(t, c, hog, 30*time.Second, "final", isFinal)
	if rec.Status != "success" {
		t.Errorf("fd-hungry function: %s %q", rec.Status, rec.Error)
	}
	checkFdHog(t, rec.Output)
	t.Logf("fd-hungry function, which ran through the flood:\n%s", rec.Output)

	f.Close()
	var after processFigures
	if !waitUntil(15*time.Second, func() bool {
		after = figures(t, a)
		return after.fds <= before.fds+4
	}) {
		t.Errorf("agent descriptors %d after the flood ended, %d before", after.fds, before.fds)
	}
	t.Logf("agent after the flood: %v", after)

	if failures := periodic.stop(); len(failures) > 0 {
		t.Errorf("Flux's periodic HealthCheck failed at the transport during the flood: %v", failures)
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("Flux's client connected %d times: its connection was closed during the flood", n)
	}
	if n := strings.Count(a.logs.String(), "gRPC server at its connection cap"); n < 1 || n > 2 {
		t.Errorf("%d log lines about the gRPC connection cap during one flood, want 1 (one a minute)", n)
	}
}

// HTTP/2 frame types the raw clients below use.
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRSTStream    = 0x3
	frameSettings     = 0x4
	framePing         = 0x6
	frameGoAway       = 0x7
	frameContinuation = 0x9

	flagAck        = 0x1
	flagEndHeaders = 0x4

	settingMaxConcurrentStreams = 0x3
	settingMaxHeaderListSize    = 0x6

	errCodeNo             = 0x0
	errCodeRefusedStream  = 0x7
	errCodeEnhanceYourCal = 0xb
)

// h2Frame is one HTTP/2 frame.
type h2Frame struct {
	typ, flags byte
	stream     uint32
	payload    []byte
}

// rawH2 is an HTTP/2 connection driven frame by frame, as a hostile or
// odd client would; it is written by hand to keep the test free of an
// HTTP/2 library.
type rawH2 struct {
	net.Conn
	wmu sync.Mutex
}

// dialH2 connects from src, over TLS when cfg is set, and sends the client
// preface and an empty SETTINGS frame.
func dialH2(t *testing.T, addr, src string, cfg *tls.Config) *rawH2 {
	t.Helper()
	c, err := dialFrom(context.Background(), src, addr)
	if err != nil {
		t.Fatal(err)
	}
	if cfg != nil {
		cfg = cfg.Clone()
		cfg.NextProtos = []string{"h2"}
		tc := tls.Client(c, cfg)
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		c = tc
	}
	h := &rawH2{Conn: c}
	t.Cleanup(func() { h.Close() })
	if _, err := io.WriteString(h, h2Preface); err != nil {
		t.Fatal(err)
	}
	h.write(frameSettings, 0, 0, nil)
	return h
}

func (h *rawH2) write(typ, flags byte, stream uint32, payload []byte) error {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	hdr := make([]byte, 9, 9+len(payload))
	hdr[0], hdr[1], hdr[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	hdr[3], hdr[4] = typ, flags
	binary.BigEndian.PutUint32(hdr[5:], stream)
	_, err := h.Write(append(hdr, payload...))
	return err
}

// read returns the next frame, answering the agent's SETTINGS and PINGs
// on the way as any client does.
func (h *rawH2) read() (h2Frame, error) {
	for {
		var hdr [9]byte
		if _, err := io.ReadFull(h, hdr[:]); err != nil {
			return h2Frame{}, err
		}
		f := h2Frame{typ: hdr[3], flags: hdr[4], stream: binary.BigEndian.Uint32(hdr[5:]) & 0x7fffffff,
			payload: make([]byte, int(hdr[0])<<16|int(hdr[1])<<8|int(hdr[2]))}
		if _, err := io.ReadFull(h, f.payload); err != nil {
			return h2Frame{}, err
		}
		switch {
		case f.typ == frameSettings && f.flags&flagAck == 0:
			h.write(frameSettings, flagAck, 0, nil)
		case f.typ == framePing && f.flags&flagAck == 0:
			h.write(framePing, flagAck, 0, f.payload)
		}
		return f, nil
	}
}

// goAway reads until the agent sends GOAWAY and returns its error code and
// debug data, or fails when the connection ends or wait passes first.
func (h *rawH2) goAway(t *testing.T, wait time.Duration) (code uint32, debug string) {
	t.Helper()
	h.SetReadDeadline(time.Now().Add(wait))
	for {
		f, err := h.read()
		if err != nil {
			t.Fatalf("no GOAWAY within %v: %v", wait, err)
		}
		if f.typ == frameGoAway && len(f.payload) >= 8 {
			return binary.BigEndian.Uint32(f.payload[4:]), string(f.payload[8:])
		}
	}
}

// hpackLiteral encodes one header as an HPACK literal without indexing,
// without Huffman coding.
func hpackLiteral(name, value string) []byte {
	b := []byte{0}
	for _, s := range []string{name, value} {
		b = hpackInt(b, len(s))
		b = append(b, s...)
	}
	return b
}

// hpackInt appends n with a 7-bit prefix (RFC 7541 §5.1).
func hpackInt(b []byte, n int) []byte {
	if n < 127 {
		return append(b, byte(n))
	}
	b = append(b, 127)
	for n -= 127; n >= 128; n >>= 7 {
		b = append(b, byte(n%128+128))
	}
	return append(b, byte(n))
}

// callHeaders opens a gRPC call to method on stream, without a message:
// the agent's handler waits for it, so the call stays in progress.
func callHeaders(method string, extra ...string) []byte {
	var b []byte
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", method},
		{":authority", "flux-agent"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		b = append(b, hpackLiteral(kv[0], kv[1])...)
	}
	for i := 0; i+1 < len(extra); i += 2 {
		b = append(b, hpackLiteral(extra[i], extra[i+1])...)
	}
	return b
}

// sendHeaders sends a header block on stream, split into HEADERS and
// CONTINUATION frames of at most 16 KiB (the agent's frame size).
func (h *rawH2) sendHeaders(stream uint32, block []byte) error {
	typ := byte(frameHeaders)
	for {
		n := min(len(block), 16<<10)
		flags := byte(0)
		if n == len(block) {
			flags = flagEndHeaders
		}
		if err := h.write(typ, flags, stream, block[:n]); err != nil {
			return err
		}
		block = block[n:]
		if len(block) == 0 {
			return nil
		}
		typ = frameContinuation
	}
}

// closedWithin reads c until the agent closes it (true) or wait passes
// (false), and says how long it took.
func closedWithin(c net.Conn, wait time.Duration) (bool, time.Duration) {
	start := time.Now()
	c.SetReadDeadline(start.Add(wait))
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			var ne net.Error
			return !(errors.As(err, &ne) && ne.Timeout()), time.Since(start)
		}
	}
}

// TestGRPCConnectionLimits checks each of the gRPC server's limits from a
// client that misbehaves in one way, with Flux's own client beside it
// working throughout: a handshake never finished (plaintext and TLS), pings
// too often, a connection left idle, too many calls on one connection, and
// oversized metadata. It takes a little more than the idle timeout.
func TestGRPCConnectionLimits(t *testing.T) {
	rs := startRedis(t)
	const maxTasks = 4
	plain := startAgent(t, rs, agentOptions{YAML: fmt.Sprintf("max_tasks: %d\n", maxTasks)})
	pki := newFluxPKI(t)
	dir := t.TempDir()
	pki.writeAgentFiles(t, dir)
	secure := startAgent(t, rs, agentOptions{YAML: tlsYAML(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "agent.pem"), filepath.Join(dir, "agent-key.pem"))})
	fluxTLS := pki.clientConfig(pki.Client.TLS)

	// Flux's client beside it all, calling every 10 s.
	flux, dials := fluxClient(t, plain.Addr, insecureCreds())
	if ok, err := healthy(flux); !ok || err != nil {
		t.Fatalf("HealthCheck: %v %v", ok, err)
	}
	periodic := startHealthLoop(flux)
	t.Cleanup(func() { periodic.stop() })
	began := time.Now()

	// Handshakes never finished, on both agents at once; each must be
	// closed at the handshake timeout.
	type pending struct {
		name string
		conn net.Conn
	}
	var half []pending
	for _, tc := range []struct {
		name string
		addr string
		kind floodKind
	}{
		{"plaintext: silent", plain.Addr, floodSilent},
		{"plaintext: half a preface", plain.Addr, floodPartialPreface},
		{"TLS: silent", secure.Addr, floodSilent},
		{"TLS: half a ClientHello", secure.Addr, floodPartialHello},
	} {
		c, err := tc.kind.open(context.Background(), fluxSource, tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		half = append(half, pending{tc.name, c})
	}
	// TLS finished with Flux's certificate, but no HTTP/2 preface.
	tlsOnly, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", secure.Addr,
		func() *tls.Config { cfg := fluxTLS.Clone(); cfg.NextProtos = []string{"h2"}; return cfg }())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tlsOnly.Close() })
	half = append(half, pending{"TLS done, no preface", tlsOnly})

	// Connections without calls, one pinging as often as a gRPC client may
	// (every 10 s), one silent: both closed at the idle timeout, with
	// GOAWAY max_idle, not for their pings.
	idleSilent := dialH2(t, plain.Addr, fluxSource, nil)
	idlePinging := dialH2(t, plain.Addr, fluxSource, nil)
	idleSince := time.Now()
	pingerDone := make(chan struct{})
	pingerStopped := make(chan struct{})
	go func() {
		defer close(pingerStopped)
		tick := time.NewTicker(10 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-pingerDone:
				return
			case <-tick.C:
				idlePinging.write(framePing, 0, 0, make([]byte, 8))
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-pingerDone:
		default:
			close(pingerDone)
		}
		<-pingerStopped
	})

	t.Run("a client pinging too often is dropped", func(t *testing.T) {
		// Each ping waits for its ACK. The first is free, each of the next
		// comes too early: the agent drops the connection at the third such
		// strike, after acknowledging the 4th ping.
		h := dialH2(t, plain.Addr, fluxSource, nil)
		h.SetReadDeadline(time.Now().Add(10 * time.Second))
		var code uint32
		var debug string
		acked := 0
	pinging:
		for acked < 10 {
			if err := h.write(framePing, 0, 0, make([]byte, 8)); err != nil {
				t.Fatalf("ping after %d acknowledged: %v", acked, err)
			}
			for {
				f, err := h.read()
				if err != nil {
					t.Fatalf("after %d pings acknowledged: %v", acked, err)
				}
				if f.typ == framePing && f.flags&flagAck != 0 {
					acked++
					break
				}
				if f.typ == frameGoAway && len(f.payload) >= 8 {
					code, debug = binary.BigEndian.Uint32(f.payload[4:]), string(f.payload[8:])
					break pinging
				}
			}
		}
		if code != errCodeEnhanceYourCal || debug != "too_many_pings" || acked != 4 {
			t.Errorf("after %d pings in a row acknowledged: GOAWAY %#x %q, want ENHANCE_YOUR_CALM too_many_pings after 4", acked, code, debug)
		}
		if closed, _ := closedWithin(h, 5*time.Second); !closed {
			t.Errorf("connection still open after GOAWAY too_many_pings")
		}
		t.Logf("dropped after %d pings in a row: GOAWAY %#x %q", acked, code, debug)
	})

	t.Run("calls per connection are bounded", func(t *testing.T) {
		want := uint32(maxTasks + grpcStreamHeadroom)
		h := dialH2(t, plain.Addr, fluxSource, nil)
		h.SetReadDeadline(time.Now().Add(5 * time.Second))
		var got uint32
		var gotHeaderList uint32
		for got == 0 {
			f, err := h.read()
			if err != nil {
				t.Fatalf("no SETTINGS from the agent: %v", err)
			}
			if f.typ != frameSettings || f.flags&flagAck != 0 {
				continue
			}
			for p := f.payload; len(p) >= 6; p = p[6:] {
				switch binary.BigEndian.Uint16(p) {
				case settingMaxConcurrentStreams:
					got = binary.BigEndian.Uint32(p[2:])
				case settingMaxHeaderListSize:
					gotHeaderList = binary.BigEndian.Uint32(p[2:])
				}
			}
			if got == 0 {
				t.Fatalf("the agent's SETTINGS do not bound concurrent streams")
			}
		}
		if got != want || gotHeaderList != grpcMaxHeaderBytes {
			t.Errorf("SETTINGS: %d concurrent streams, %d bytes of headers; want %d (max_tasks %d + %d), %d",
				got, gotHeaderList, want, maxTasks, grpcStreamHeadroom, grpcMaxHeaderBytes)
		}
		// A client that ignores the setting: the calls past it are refused,
		// those before it stay.
		for i := range want + 3 {
			if err := h.sendHeaders(2*i+1, callHeaders("/flux.AgentService/HealthCheck")); err != nil {
				t.Fatal(err)
			}
		}
		refused := map[uint32]bool{}
		h.SetReadDeadline(time.Now().Add(10 * time.Second))
		for len(refused) < 3 {
			f, err := h.read()
			if err != nil {
				t.Fatalf("%d calls refused before %v", len(refused), err)
			}
			if f.typ == frameRSTStream {
				if code := binary.BigEndian.Uint32(f.payload); code != errCodeRefusedStream {
					t.Errorf("stream %d reset with %#x, want REFUSED_STREAM", f.stream, code)
				}
				refused[f.stream] = true
			}
		}
		for s := range refused {
			if s <= 2*want-1 {
				t.Errorf("stream %d refused, below the limit of %d", s, want)
			}
		}
		// Flux's calls on its own connection are not affected.
		if ok, err := healthy(flux); !ok || err != nil {
			t.Errorf("HealthCheck on Flux's connection while another holds %d calls: %v %v", want, ok, err)
		}
	})

	t.Run("oversized metadata is refused", func(t *testing.T) {
		// 600 empty headers: 2.4 KiB on the wire, one frame, but 21 000
		// bytes by HPACK's count (32 per field beside name and value), past
		// the cap; gRPC's default, 16 MiB, would let them through. (A list
		// that needs more frames than one makes the agent close the
		// connection, which refuses it too.)
		h := dialH2(t, plain.Addr, fluxSource, nil)
		var extra []string
		for range 600 {
			extra = append(extra, "x-a", "")
		}
		if err := h.sendHeaders(1, callHeaders("/flux.AgentService/HealthCheck", extra...)); err != nil {
			t.Fatal(err)
		}
		h.write(frameData, 0x1, 1, []byte{0, 0, 0, 0, 0}) // an empty request, END_STREAM
		h.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			f, err := h.read()
			if err != nil {
				t.Fatalf("no answer to oversized headers: %v", err)
			}
			if f.stream != 1 {
				continue
			}
			if f.typ != frameRSTStream {
				t.Errorf("oversized headers answered with frame type %#x, want RST_STREAM", f.typ)
			}
			break
		}
		// Metadata of a usual size is fine.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
			"x-flux-user", strings.Repeat("u", 4<<10))
		if _, err := flux.HealthCheck(ctx, &fluxpb.HealthCheckRequest{}); err != nil {
			t.Errorf("HealthCheck with 4 KiB of metadata: %v", err)
		}
	})

	t.Run("handshakes that never finish are closed at the timeout", func(t *testing.T) {
		for _, p := range half {
			closed, _ := closedWithin(p.conn, grpcHandshakeTimeout+5*time.Second-time.Since(began))
			took := time.Since(began)
			if !closed || took < grpcHandshakeTimeout-time.Second {
				t.Errorf("%s: closed %v after %v, want closed at the %v handshake timeout", p.name, closed, took.Round(time.Millisecond), grpcHandshakeTimeout)
			} else {
				t.Logf("%s: closed after %v", p.name, took.Round(time.Millisecond))
			}
		}
	})

	t.Run("connections without calls are closed at the idle timeout", func(t *testing.T) {
		wait := grpcIdleTimeout + 10*time.Second - time.Since(idleSince)
		for name, h := range map[string]*rawH2{"silent": idleSilent, "pinging every 10s": idlePinging} {
			code, debug := h.goAway(t, wait)
			took := time.Since(idleSince)
			if code != errCodeNo || debug != "max_idle" || took < grpcIdleTimeout-time.Second {
				t.Errorf("%s connection: GOAWAY %#x %q after %v, want NO_ERROR max_idle after %v", name, code, debug, took.Round(time.Millisecond), grpcIdleTimeout)
			} else {
				t.Logf("%s connection: GOAWAY %q after %v", name, debug, took.Round(time.Millisecond))
			}
		}
	})

	if failures := periodic.stop(); len(failures) > 0 {
		t.Errorf("Flux's periodic HealthCheck failed: %v", failures)
	}
	if n := periodic.calls.Load(); n < 6 {
		t.Errorf("Flux's periodic HealthCheck ran %d times, want one every 10 s", n)
	}
	if ok, err := healthy(flux); !ok || err != nil {
		t.Errorf("HealthCheck at the end: %v %v", ok, err)
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("Flux's client connected %d times in %v: its connection was closed", n, time.Since(began).Round(time.Second))
	}
}
