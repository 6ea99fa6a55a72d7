//go:build linux

package doctor

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// find returns the check named name, failing the test when there is none.
func find(t *testing.T, r Report, name string) Check {
	t.Helper()
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no check %q in:\n%s", name, reportText(r))
	return Check{}
}

func reportText(r Report) string {
	var b strings.Builder
	r.WriteTo(&b)
	return b.String()
}

func TestCheckLineAndRefusal(t *testing.T) {
	ok := Check{Name: "redis_addr", Status: OK, Detail: "answers", Fix: "ignored"}
	bad := Check{Name: "apps_dir", Status: Fail, Detail: "cannot enter /x", Fix: "chmod o+x /x"}
	warn := Check{Name: "favordynmods", Status: Warn, Detail: "off", Fix: "boot with it"}
	for _, tc := range []struct {
		c    Check
		want string
	}{
		{ok, "✓ redis_addr: answers"},
		{bad, "✗ apps_dir: cannot enter /x — fix: chmod o+x /x"},
		{warn, "! favordynmods: off — fix: boot with it"},
	} {
		if got := tc.c.String(); got != tc.want {
			t.Errorf("line %q, want %q", got, tc.want)
		}
	}
	r := Report{Checks: []Check{ok, bad, warn}}
	if f := r.Failed(); len(f) != 1 || f[0].Name != "apps_dir" {
		t.Errorf("failed %v", f)
	}
	err := error(&Refusal{Failed: r.Failed()})
	if !errors.Is(err, ErrNotReady) || !strings.Contains(err.Error(), bad.String()) {
		t.Errorf("refusal %q", err)
	}
}

// fakeRunner is a runner user that owns nothing on the host.
func fakeRunner(uid, gid int) func(string) (*user.User, error) {
	return func(name string) (*user.User, error) {
		if name != "runner" {
			return nil, user.UnknownUserError(name)
		}
		return &user.User{Username: "runner", Uid: strconv.Itoa(uid), Gid: strconv.Itoa(gid)}, nil
	}
}

// startupAsRoot runs the start-up checks as the agent would as root, with
// a runner that owns nothing and a range in a fixture /etc/subuid.
func startupAsRoot(t *testing.T, cfg Config) Report {
	t.Helper()
	etc := t.TempDir()
	if err := os.WriteFile(filepath.Join(etc, "subuid"), []byte("other:100000:65536\nrunner:3000000:1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if cfg.EtcDir == "" {
		cfg.EtcDir = etc
	}
	if cfg.LookupUser == nil {
		cfg.LookupUser = fakeRunner(2999999, 2999998)
	}
	if cfg.RunAsUser == "" {
		cfg.RunAsUser = "runner"
	}
	cfg.Euid = func() int { return 0 }
	if cfg.Network == "" {
		cfg.Network = "host"
	}
	return Startup(cfg)
}

// hostDir is a directory outside /tmp (which the check treats as each
// function's private tmpfs), removed at the end.
func hostDir(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(wd, "testhost-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
			if err == nil && info.IsDir() {
				os.Chmod(p, 0o755)
			}
			return nil
		})
		os.RemoveAll(dir)
	})
	os.Chmod(dir, 0o755)
	return dir
}

func TestAppsDirWalk(t *testing.T) {
	base := hostDir(t)
	mk := func(path string, mode os.FileMode) string {
		t.Helper()
		if err := os.MkdirAll(path, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	open := mk(filepath.Join(base, "open"), 0o755)
	enterOnly := mk(filepath.Join(base, "enter-only"), 0o711)
	private := mk(filepath.Join(base, "private"), 0o700)
	if err := os.Symlink(filepath.Join(private, "apps"), filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, appsDir string
		want          Status
		words         []string
	}{
		{"reachable, not made yet", filepath.Join(open, "apps", "deeper"), OK, []string{"lets the runner's group (runner, gid 2999998) through"}},
		{"enter without listing", filepath.Join(enterOnly, "apps"), OK, nil},
		{"under a 0700 directory", filepath.Join(private, "apps"), Fail, []string{
			"cannot enter " + private, "drwx------", "permission denied", "chmod o+x " + private}},
		{"through a symlink into a 0700 directory", filepath.Join(base, "link"), Fail, []string{"cannot enter " + private}},
		{"under /tmp", "/tmp/flux-apps", Fail, []string{"empty tmpfs", "move apps_dir out of /tmp"}},
		{"under /dev/shm", "/dev/shm/apps", Fail, []string{"/dev/shm"}},
		{"relative", "apps", Fail, []string{"absolute"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startupAsRoot(t, Config{AppsDir: tc.appsDir})
			c := find(t, r, "apps_dir")
			if c.Status != tc.want {
				t.Fatalf("status %v, want %v: %s", c.Status, tc.want, c)
			}
			for _, w := range tc.words {
				if !strings.Contains(c.String(), w) {
					t.Errorf("%q lacks %q", c.String(), w)
				}
			}
		})
	}
}

// TestAppsDirGroupBits: the runner's group's bits count for it, the
// others' for everyone else.
func TestAppsDirGroupBits(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown to the runner's group")
	}
	base := hostDir(t)
	dir := filepath.Join(base, "group-only")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 0, 2999998); err != nil {
		t.Fatal(err)
	}
	r := startupAsRoot(t, Config{AppsDir: filepath.Join(dir, "apps")})
	if c := find(t, r, "apps_dir"); c.Status != OK {
		t.Errorf("group r-x for the runner's group: %s", c)
	}
	r = startupAsRoot(t, Config{AppsDir: filepath.Join(dir, "apps"), LookupUser: fakeRunner(2999999, 2999997)})
	if c := find(t, r, "apps_dir"); c.Status != Fail {
		t.Errorf("another group: %s", c)
	}
}

func TestRunnerAndUIDRange(t *testing.T) {
	r := startupAsRoot(t, Config{RunAsUser: "nosuchuser", AppsDir: "/var/lib/flux-agent/apps"})
	c := find(t, r, "sandbox.run_as_user")
	if c.Status != Fail || !strings.Contains(c.Detail, `user "nosuchuser" does not exist`) || !strings.Contains(c.Fix, "useradd --system") {
		t.Errorf("missing runner: %s", c)
	}
	for _, ck := range r.Checks {
		if ck.Name == "apps_dir" {
			t.Errorf("apps_dir checked without a runner: %s", ck)
		}
	}

	r = startupAsRoot(t, Config{AppsDir: "/var/lib/flux-agent/apps"})
	if c := find(t, r, "sandbox.uid_range"); c.Status != OK || !strings.Contains(c.Detail, "3000000-3000999") {
		t.Errorf("range from subuid: %s", c)
	}

	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "subuid"), []byte("other:100000:65536\n"), 0o644)
	r = startupAsRoot(t, Config{EtcDir: etc, AppsDir: "/var/lib/flux-agent/apps"})
	if c := find(t, r, "sandbox.uid_range"); c.Status != Fail || !strings.Contains(c.Fix, "usermod --add-subuids 1879048192-1879113727") {
		t.Errorf("no range: %s", c)
	}

	r = startupAsRoot(t, Config{UIDs: sandbox.UIDRange{First: 2999990, Count: 20}, AppsDir: "/var/lib/flux-agent/apps"})
	if c := find(t, r, "sandbox.uid_range"); c.Status != Fail {
		t.Errorf("a range holding the runner's uid: %s", c)
	}
	r = startupAsRoot(t, Config{SharedUID: true, AppsDir: "/var/lib/flux-agent/apps"})
	if c := find(t, r, "sandbox.uid_range"); c.Status != Warn {
		t.Errorf("shared: %s", c)
	}

	r = startupAsRoot(t, Config{AppsDir: "/var/lib/flux-agent/apps", LookupUser: fakeRunner(0, 0)})
	if c := find(t, r, "sandbox.run_as_user"); c.Status != Fail {
		t.Errorf("a runner with uid 0: %s", c)
	}
}

func TestNetworkNeedsARange(t *testing.T) {
	r := startupAsRoot(t, Config{AppsDir: "/var/lib/flux-agent/apps", SharedUID: true, Network: "filtered"})
	if c := find(t, r, "sandbox.network"); c.Status != Fail || !strings.Contains(c.Fix, "sandbox.network: host") {
		t.Errorf("filtered with a shared uid: %s", c)
	}
	r = startupAsRoot(t, Config{AppsDir: "/var/lib/flux-agent/apps", Network: "host"})
	if c := find(t, r, "sandbox.network"); c.Status != Warn {
		t.Errorf("host: %s", c)
	}
}

func TestParseCapEff(t *testing.T) {
	caps, err := parseCapEff(strings.NewReader("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"))
	if err != nil || caps&(1<<capNetAdmin) == 0 {
		t.Errorf("root's caps: %x %v", caps, err)
	}
	caps, err = parseCapEff(strings.NewReader("CapEff:\t0000000000000000\n"))
	if err != nil || caps != 0 {
		t.Errorf("no caps: %x %v", caps, err)
	}
	if _, err := parseCapEff(strings.NewReader("Name:\tx\n")); err == nil {
		t.Error("no CapEff line: no error")
	}
}

func TestCgroupLayoutAndFavorDynMods(t *testing.T) {
	for _, tc := range []struct {
		name, fixture, cmdline string
		v1, v2                 bool
		favor                  bool
	}{
		{"hybrid", "testdata/hybrid", "console=ttyS0 quiet", true, true, false},
		{"hybrid, boot parameter", "testdata/hybrid", "quiet cgroup_favordynmods=true", true, true, true},
		{"v2", "testdata/v2", "", false, true, false},
		{"v2 with the mount option", "testdata/v2-favordynmods", "cgroup_favordynmods=0", false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newChecker(Config{ProcDir: tc.fixture})
			l, err := c.layout()
			if err != nil {
				t.Fatal(err)
			}
			if (l.v1["memory"] != "") != tc.v1 || (l.v2 != "") != tc.v2 {
				t.Errorf("layout %+v", l)
			}
			if on, _ := favorDynMods(l, tc.cmdline); on != tc.favor {
				t.Errorf("favordynmods %v, want %v", on, tc.favor)
			}
		})
	}
}

func TestListeners(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	free.Close()
	stale := filepath.Join(t.TempDir(), "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	live := filepath.Join(t.TempDir(), "live.sock")
	ll, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()

	c := newChecker(Config{})
	for _, tc := range []struct {
		l     Listener
		agent *RunningAgent
		want  Status
		words string
	}{
		{Listener{"port", "tcp", held.Addr().String()}, nil, Fail, "ss -ltnp"},
		{Listener{"port", "tcp", ":" + portOf(held.Addr().String())}, &RunningAgent{Pid: 7, GRPCAddress: "[::]:" + portOf(held.Addr().String())}, OK, "held by the running agent (pid 7)"},
		{Listener{"telemetry.metrics_address", "tcp", freeAddr}, nil, OK, "is free"},
		{Listener{"port", "tcp", "127.0.0.1:0"}, nil, OK, "chosen at start"},
		{Listener{"telemetry.metrics_address", "tcp", ""}, nil, OK, "off"},
		{Listener{"admin.socket", "unix", stale}, nil, OK, "replaces it"},
		{Listener{"admin.socket", "unix", live}, nil, Fail, "another process"},
		{Listener{"admin.socket", "unix", live}, &RunningAgent{AdminSocket: live}, OK, "running agent"},
	} {
		c.cfg.Agent = tc.agent
		got := c.checkListener(tc.l)
		if got.Status != tc.want || !strings.Contains(got.String(), tc.words) {
			t.Errorf("%+v: %s, want %v with %q", tc.l, got, tc.want, tc.words)
		}
	}
}

func TestRedisAndClock(t *testing.T) {
	addr := startRedis(t)
	r := Run(context.Background(), Config{
		RunAsUser: "runner", LookupUser: fakeRunner(2999999, 2999998), Network: "host", AppsDir: "/var/lib/flux-agent/apps",
		Redis: &redis.UniversalOptions{Addrs: []string{addr}}, RedisAddr: "redis://" + addr,
	})
	c := find(t, r, "redis_addr")
	if c.Status != OK || !strings.Contains(c.Detail, "answers in") {
		t.Errorf("redis up: %s", c)
	}
	if c := find(t, r, "clock"); !strings.Contains(c.Detail, "from Redis's clock") {
		t.Errorf("clock: %s", c)
	}

	down := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	r = Run(context.Background(), Config{
		RunAsUser: "runner", LookupUser: fakeRunner(2999999, 2999998), Network: "host", AppsDir: "/var/lib/flux-agent/apps",
		Redis: &redis.UniversalOptions{Addrs: []string{down}}, RedisAddr: "redis://" + down,
	})
	if c := find(t, r, "redis_addr"); c.Status != Fail || !strings.Contains(c.Fix, "systemctl start redis-server") {
		t.Errorf("redis down: %s", c)
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startRedis runs a real redis-server on a loopback port until the end of
// the test.
func startRedis(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skipf("redis-server is needed (apt-get install redis-server): %v", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	_, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(path, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", t.TempDir())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for rdb.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not answer")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return addr
}

// pki makes a CA and certificates signed by it, as Flux mints them.
type pki struct {
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPath string
}

func newPKI(t *testing.T, notAfter time.Time) *pki {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "flux-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter,
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{dir: t.TempDir(), ca: ca, caKey: key}
	p.caPath = p.write(t, "ca.pem", "CERTIFICATE", der)
	return p
}

func (p *pki) write(t *testing.T, name, kind string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// cert writes a server certificate and its key; it returns their paths.
func (p *pki) cert(t *testing.T, name string, dns []string, notBefore, notAfter time.Time) (string, string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name}, DNSNames: dns,
		NotBefore: notBefore, NotAfter: notAfter,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	return p.write(t, name+".pem", "CERTIFICATE", der), p.write(t, name+"-key.pem", "EC PRIVATE KEY", keyDER)
}

func TestTLS(t *testing.T) {
	now := time.Now()
	p := newPKI(t, now.AddDate(5, 0, 0))
	good, goodKey := p.cert(t, "good", []string{"flux-agent"}, now.Add(-time.Hour), now.AddDate(1, 0, 0))
	expired, expiredKey := p.cert(t, "expired", []string{"flux-agent"}, now.AddDate(-1, 0, 0), now.Add(-time.Hour))
	soon, soonKey := p.cert(t, "soon", []string{"flux-agent"}, now.Add(-time.Hour), now.AddDate(0, 0, 3))
	other, otherKey := p.cert(t, "other", []string{"example.com"}, now.Add(-time.Hour), now.AddDate(1, 0, 0))
	stranger := newPKI(t, now.AddDate(5, 0, 0))
	foreign, foreignKey := stranger.cert(t, "foreign", []string{"flux-agent"}, now.Add(-time.Hour), now.AddDate(1, 0, 0))
	for _, tc := range []struct {
		name  string
		files TLSFiles
		want  Status
		words string
	}{
		{"off", TLSFiles{}, OK, "plaintext"},
		{"good", TLSFiles{true, p.caPath, good, goodKey}, OK, "names flux-agent"},
		{"expired", TLSFiles{true, p.caPath, expired, expiredKey}, Fail, "not valid now"},
		{"expires soon", TLSFiles{true, p.caPath, soon, soonKey}, Warn, "days left"},
		{"another name", TLSFiles{true, p.caPath, other, otherKey}, Fail, "does not name flux-agent"},
		{"another CA", TLSFiles{true, p.caPath, foreign, foreignKey}, Fail, "not accepted"},
		{"key of another", TLSFiles{true, p.caPath, good, otherKey}, Fail, "minted together"},
		{"missing", TLSFiles{true, p.caPath, good, filepath.Join(p.dir, "nope.pem")}, Fail, "tls.key_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := find(t, Startup(Config{TLS: tc.files, Network: "host", AppsDir: "/var/lib/flux-agent/apps"}), "tls")
			if c.Status != tc.want || !strings.Contains(c.String(), tc.words) {
				t.Errorf("%s, want %v with %q", c, tc.want, tc.words)
			}
		})
	}
}
