// Package doctor checks that a host and an agent's configuration can run
// functions, and says how to fix what cannot. `flux-agent doctor` prints
// every check; the agent runs the checks that would make every execution
// fail (Startup) before it starts, and refuses to start with the same
// words.
package doctor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// Status is how a check came out.
type Status int

// The statuses, from good to bad.
const (
	// OK: nothing to do.
	OK Status = iota
	// Warn: functions run, with part of their isolation or speed missing,
	// or a failure ahead (a certificate about to expire).
	Warn
	// Fail: executions cannot run (or Flux cannot reach the agent) until
	// it is fixed.
	Fail
)

// Symbol is how a report shows the status.
func (s Status) Symbol() string {
	switch s {
	case OK:
		return "✓"
	case Warn:
		return "!"
	}
	return "✗"
}

func (s Status) String() string {
	switch s {
	case OK:
		return "ok"
	case Warn:
		return "warn"
	}
	return "fail"
}

// Check is one finding: what was checked (a config key where there is
// one), what was found, and what to do about it.
type Check struct {
	Name   string `json:"name"`
	Status Status `json:"-"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// String is the check's line in a report: "✗ apps_dir: … — fix: …".
func (c Check) String() string {
	s := c.Status.Symbol() + " " + c.Name + ": " + c.Detail
	if c.Fix != "" && c.Status != OK {
		s += " — fix: " + c.Fix
	}
	return s
}

// Report is every check made, in order.
type Report struct {
	Checks []Check
}

// Failed lists the checks that block executions.
func (r Report) Failed() []Check {
	var failed []Check
	for _, c := range r.Checks {
		if c.Status == Fail {
			failed = append(failed, c)
		}
	}
	return failed
}

// WriteTo writes one line per check.
func (r Report) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for _, c := range r.Checks {
		m, err := fmt.Fprintln(w, c.String())
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// ErrNotReady is what the agent's start fails with when a check that
// blocks every execution fails; errors.As finds the *Refusal.
var ErrNotReady = errors.New("this host cannot run functions")

// Refusal is the error of a start the checks refused: the failed checks,
// in doctor's words.
type Refusal struct {
	Failed []Check
}

func (r *Refusal) Error() string {
	lines := make([]string, len(r.Failed))
	for i, c := range r.Failed {
		lines[i] = c.String()
	}
	return ErrNotReady.Error() + " (flux-agent doctor checks the whole host):\n" + strings.Join(lines, "\n")
}

func (r *Refusal) Unwrap() error { return ErrNotReady }

// TLSFiles are the agent's mTLS files (tls.*).
type TLSFiles struct {
	Enabled                   bool
	CACert, CertFile, KeyFile string
}

// Listener is an address the agent binds: a config key and what it says.
type Listener struct {
	Key     string // e.g. "port", "telemetry.metrics_address", "admin.socket"
	Network string // "tcp" or "unix"
	Address string
}

// RunningAgent is what the running agent said of itself on its admin
// socket: the ports it holds are not a conflict.
type RunningAgent struct {
	Pid            int
	GRPCAddress    string
	MetricsAddress string
	AdminSocket    string
}

// Config is what the checks need of the agent's configuration.
type Config struct {
	// ConfigFile is the config file read; "" when none was (defaults and
	// FLUX_AGENT_* variables).
	ConfigFile string
	RunAsUser  string
	// UIDs is sandbox.uid_range when fixed; a zero Count with SharedUID
	// false means auto (the runner's /etc/subuid range).
	UIDs       sandbox.UIDRange
	SharedUID  bool
	AppsDir    string
	CgroupRoot string
	Network    sandbox.NetworkMode
	TLS        TLSFiles
	// Redis is how the agent reaches Redis; RedisAddr names it in words.
	Redis     *redis.UniversalOptions
	RedisAddr string
	Listeners []Listener
	// Agent is the agent running now, if its admin socket answered.
	Agent *RunningAgent

	// Where the host is read; empty means the real one. Tests point them
	// at fixtures.
	ProcDir    string // /proc
	EtcDir     string // /etc
	LookupUser func(name string) (*user.User, error)
	Euid       func() int
	Now        func() time.Time
}

func (c *Config) defaults() {
	if c.ProcDir == "" {
		c.ProcDir = "/proc"
	}
	if c.EtcDir == "" {
		c.EtcDir = "/etc"
	}
	if c.LookupUser == nil {
		c.LookupUser = user.Lookup
	}
	if c.Euid == nil {
		c.Euid = os.Geteuid
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// checker runs the checks of one report; later checks use what earlier
// ones found (the runner user).
type checker struct {
	cfg    Config
	root   bool
	runner *runner // nil: no usable runner
	report Report
}

// runner is the user functions run as, and the uids they get.
type runner struct {
	name     string
	uid, gid uint32
	uids     sandbox.UIDRange // empty: they run as uid itself
}

func newChecker(cfg Config) *checker {
	cfg.defaults()
	return &checker{cfg: cfg, root: cfg.Euid() == 0}
}

func (c *checker) add(ck Check) { c.report.Checks = append(c.report.Checks, ck) }

// Startup runs the checks whose failure would make every execution fail
// (or keep Flux out), without the network: the agent runs them before it
// starts and refuses to start on any failure. Redis is not among them: the
// agent rides a Redis outage and says so in HealthCheck.
func Startup(cfg Config) Report {
	c := newChecker(cfg)
	c.startup()
	return c.report
}

func (c *checker) startup() {
	c.checkRoot()
	c.checkRunner()
	c.checkUIDRange()
	c.checkAppsDir()
	c.checkNetwork()
	c.checkTLS()
}

// Run runs every check: Startup's, then cgroups, favordynmods, Redis, the
// clock and the ports.
func Run(ctx context.Context, cfg Config) Report {
	c := newChecker(cfg)
	if cfg.ConfigFile == "" {
		c.add(Check{Name: "config", Status: Warn, Detail: "no config file read: defaults and FLUX_AGENT_* variables (AGENT_CONFIG names the file; ./agent.yaml by default)",
			Fix: "point AGENT_CONFIG at the agent's config, e.g. AGENT_CONFIG=/etc/flux-agent/agent.yaml flux-agent doctor"})
	} else {
		c.add(Check{Name: "config", Status: OK, Detail: cfg.ConfigFile})
	}
	c.startup()
	c.checkCgroups()
	c.checkFavorDynMods()
	rtt := c.checkRedis(ctx)
	c.checkClock(ctx, rtt)
	c.checkListeners()
	return c.report
}

// checkTLS reads the mTLS files as the agent will, and checks what Flux
// will check: a certificate for the name flux-agent, signed by the CA,
// valid now.
func (c *checker) checkTLS() {
	const key = "tls"
	t := c.cfg.TLS
	if !t.Enabled {
		c.add(Check{Name: key, Status: OK, Detail: "off: gRPC in plaintext (Flux's bootstrap turns mutual TLS on)"})
		return
	}
	read := func(k, path string) ([]byte, bool) {
		data, err := os.ReadFile(path)
		if err != nil {
			c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("tls.%s: %v", k, err), Fix: "point tls." + k + " at the file Flux's bootstrap wrote (ca.pem, agent.pem, agent-key.pem), readable by root"})
			return nil, false
		}
		return data, true
	}
	caPEM, ok1 := read("ca_cert", t.CACert)
	certPEM, ok2 := read("cert_file", t.CertFile)
	keyPEM, ok3 := read("key_file", t.KeyFile)
	if !ok1 || !ok2 || !ok3 {
		return
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("tls.cert_file %s with tls.key_file %s: %v", t.CertFile, t.KeyFile, err), Fix: "use the certificate and the key Flux minted together"})
		return
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("tls.cert_file %s: %v", t.CertFile, err), Fix: "use the certificate Flux minted"})
		return
	}
	pool := x509.NewCertPool()
	var ca *x509.Certificate
	for rest := caPEM; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		if parsed, err := x509.ParseCertificate(block.Bytes); err == nil {
			pool.AddCert(parsed)
			ca = parsed
		}
	}
	if ca == nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("tls.ca_cert %s holds no certificate", t.CACert), Fix: "use Flux's ca.pem"})
		return
	}
	now := c.cfg.Now()
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		var expired x509.CertificateInvalidError
		detail := fmt.Sprintf("%s is not accepted under %s: %v", t.CertFile, t.CACert, err)
		if errors.As(err, &expired) && expired.Reason == x509.Expired {
			detail = fmt.Sprintf("%s or its CA is not valid now (%s to %s): Flux refuses it", t.CertFile, cert.NotBefore.Format(time.DateOnly), cert.NotAfter.Format(time.DateOnly))
		}
		c.add(Check{Name: key, Status: Fail, Detail: detail, Fix: "have Flux mint a new certificate (re-register the agent)"})
		return
	}
	if !slices.Contains(cert.DNSNames, "flux-agent") {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s does not name flux-agent (it names %v), the name Flux checks", t.CertFile, cert.DNSNames),
			Fix: "use a certificate with the DNS name flux-agent, as Flux mints them"})
		return
	}
	left := cert.NotAfter.Sub(now)
	if caLeft := ca.NotAfter.Sub(now); caLeft < left {
		left = caLeft
	}
	detail := fmt.Sprintf("%s names flux-agent, signed by %s, valid until %s", t.CertFile, t.CACert, cert.NotAfter.Format(time.DateOnly))
	if left < certRenewWithin {
		c.add(Check{Name: key, Status: Warn, Detail: detail + fmt.Sprintf(" (%d days left, CA included)", int(left.Hours()/24)), Fix: "have Flux mint a new certificate before it expires"})
		return
	}
	c.add(Check{Name: key, Status: OK, Detail: detail})
}

// certRenewWithin is how early an expiry is worth a warning.
const certRenewWithin = 14 * 24 * time.Hour

// redisSlow is a round trip worth a warning: every execution makes a few.
const redisSlow = 20 * time.Millisecond

// checkRedis pings Redis as the agent would reach it; it returns the
// round trip (0 when Redis did not answer).
func (c *checker) checkRedis(ctx context.Context) time.Duration {
	const key = "redis_addr"
	if c.cfg.Redis == nil {
		return 0
	}
	opts := *c.cfg.Redis
	opts.DialTimeout, opts.ReadTimeout, opts.MaxRetries = 2*time.Second, 2*time.Second, -1
	rdb := redis.NewUniversalClient(&opts)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil { // the first one dials
		fix := "start it (systemctl start redis-server) or fix redis_addr"
		if strings.Contains(err.Error(), "NOAUTH") || strings.Contains(err.Error(), "WRONGPASS") {
			fix = "put the right user and password in redis_addr (redis://user:password@host:port)"
		}
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s does not answer: %v; no execution can start", c.cfg.RedisAddr, err), Fix: fix})
		return 0
	}
	start := time.Now()
	if err := rdb.Ping(ctx).Err(); err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s answered once, then: %v", c.cfg.RedisAddr, err), Fix: "check Redis's health and the network to it"})
		return 0
	}
	rtt := time.Since(start)
	detail := fmt.Sprintf("%s answers in %s", c.cfg.RedisAddr, formatRTT(rtt))
	if rtt > redisSlow {
		c.add(Check{Name: key, Status: Warn, Detail: detail + ": every execution waits for a few round trips", Fix: "use a Redis close to the node"})
		return rtt
	}
	c.add(Check{Name: key, Status: OK, Detail: detail})
	return rtt
}

func formatRTT(d time.Duration) string {
	return strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 2, 64) + " ms"
}

// checkClock warns of a clock that is not kept in sync: records carry the
// agent's times, certificates are checked against it, and Redis keeps its
// own for TTLs.
func (c *checker) checkClock(ctx context.Context, rtt time.Duration) {
	const key = "clock"
	synced, syncErr := clockSynced()
	skew, measured := c.clockSkew(ctx, rtt)
	suffix := ""
	if measured {
		suffix = fmt.Sprintf(", %s from Redis's clock", skew.Round(time.Millisecond))
	}
	switch {
	case measured && (skew > clockSkewMax || skew < -clockSkewMax):
		c.add(Check{Name: key, Status: Warn, Detail: fmt.Sprintf("%s apart from Redis's clock", skew.Round(time.Millisecond)),
			Fix: "keep both hosts' clocks in sync (timedatectl set-ntp true, or chrony)"})
	case syncErr == nil && !synced:
		c.add(Check{Name: key, Status: Warn, Detail: "the kernel says the clock is not synchronized (record times and certificate checks drift)" + suffix,
			Fix: "enable time sync: timedatectl set-ntp true (systemd-timesyncd), or install chrony"})
	case syncErr != nil:
		c.add(Check{Name: key, Status: OK, Detail: "sync state unknown" + suffix})
	default:
		c.add(Check{Name: key, Status: OK, Detail: "synchronized" + suffix})
	}
}

// clockSkew compares the clock with Redis's, allowing for the round trip.
func (c *checker) clockSkew(ctx context.Context, rtt time.Duration) (time.Duration, bool) {
	if c.cfg.Redis == nil || rtt == 0 {
		return 0, false
	}
	opts := *c.cfg.Redis
	opts.MaxRetries = -1
	rdb := redis.NewUniversalClient(&opts)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		return 0, false
	}
	before := time.Now()
	theirs, err := rdb.Time(ctx).Result()
	after := time.Now()
	if err != nil {
		return 0, false
	}
	mid := before.Add(after.Sub(before) / 2)
	return mid.Sub(theirs), true
}

// clockSkewMax is a difference with Redis's clock worth a warning.
const clockSkewMax = time.Second

// checkListeners checks that every address the agent binds is free, or
// held by the running agent itself.
func (c *checker) checkListeners() {
	for _, l := range c.cfg.Listeners {
		c.add(c.checkListener(l))
	}
}

func (c *checker) checkListener(l Listener) Check {
	ck := Check{Name: l.Key}
	if l.Address == "" {
		ck.Detail = "off"
		return ck
	}
	if a := c.cfg.Agent; a != nil && heldBy(l, a) {
		ck.Detail = fmt.Sprintf("%s, held by the running agent (pid %d)", l.Address, a.Pid)
		return ck
	}
	if l.Network == "unix" {
		return c.checkSocket(l)
	}
	if _, port, err := net.SplitHostPort(l.Address); err == nil && port == "0" {
		ck.Detail = l.Address + ": a free port is chosen at start"
		return ck
	}
	ln, err := net.Listen("tcp", l.Address)
	if err != nil {
		ck.Status = Fail
		ck.Detail = fmt.Sprintf("%s cannot be bound: %v", l.Address, err)
		ck.Fix = fmt.Sprintf("stop what holds it (ss -ltnp 'sport = :%s' names it) or change %s", portOf(l.Address), l.Key)
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			ck.Fix = "use an address of this host in " + l.Key
		}
		return ck
	}
	ln.Close()
	ck.Detail = l.Address + " is free"
	return ck
}

// checkSocket: a socket file nobody answers on is stale (the agent
// replaces it); one that answers belongs to another agent.
func (c *checker) checkSocket(l Listener) Check {
	ck := Check{Name: l.Key}
	conn, err := net.DialTimeout("unix", l.Address, time.Second)
	if err == nil {
		conn.Close()
		ck.Status = Fail
		ck.Detail = l.Address + " is served by another process"
		ck.Fix = "stop the other agent, or give this one its own admin.socket"
		return ck
	}
	if _, serr := os.Lstat(l.Address); serr == nil {
		ck.Detail = l.Address + " is left by an agent that stopped; the next start replaces it"
		return ck
	}
	ck.Detail = l.Address + " is free"
	return ck
}

func heldBy(l Listener, a *RunningAgent) bool {
	switch l.Key {
	case "admin.socket":
		return a.AdminSocket != "" && a.AdminSocket == l.Address
	case "telemetry.metrics_address":
		return samePort(l.Address, a.MetricsAddress)
	default:
		return samePort(l.Address, a.GRPCAddress)
	}
}

// samePort compares the port of a configured address with the one a
// listener reports (the host may be written differently: ":50052" and
// "[::]:50052").
func samePort(configured, actual string) bool {
	if actual == "" {
		return false
	}
	return portOf(configured) == portOf(actual) && portOf(actual) != ""
}

func portOf(addr string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	return port
}
