package e2e

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// tlsCA is a certificate authority made in the test, standing in for
// Flux's CA (or a stranger's).
type tlsCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	PEM  []byte
	Pool *x509.CertPool
}

var tlsSerial atomic.Int64

func newTLSCA(t testing.TB, name string) *tlsCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(tlsSerial.Add(1)),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"Serverless Fabric e2e"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tlsCA{cert: cert, key: key, PEM: pemBlock("CERTIFICATE", der), Pool: pool}
}

// tlsLeaf describes a certificate the CA signs.
type tlsLeaf struct {
	CommonName string
	DNSNames   []string
	Usages     []x509.ExtKeyUsage
	NotAfter   time.Time // zero: a day from now
}

// issuedCert is a signed certificate and its key, as PEM and ready for
// crypto/tls.
type issuedCert struct {
	CertPEM, KeyPEM []byte
	TLS             tls.Certificate
}

func (ca *tlsCA) issue(t testing.TB, leaf tlsLeaf) issuedCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := leaf.NotAfter
	if notAfter.IsZero() {
		notAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(tlsSerial.Add(1)),
		Subject:      pkix.Name{CommonName: leaf.CommonName},
		DNSNames:     leaf.DNSNames,
		NotBefore:    time.Now().Add(-48 * time.Hour),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  leaf.Usages,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	ic := issuedCert{CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: pemBlock("PRIVATE KEY", keyDER)}
	ic.TLS, err = tls.X509KeyPair(ic.CertPEM, ic.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return ic
}

func pemBlock(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}

// fluxPKI is what Flux holds: its CA, the agent certificate it minted and
// its own client certificate.
type fluxPKI struct {
	CA     *tlsCA
	Agent  issuedCert
	Client issuedCert
}

func newFluxPKI(t testing.TB) *fluxPKI {
	ca := newTLSCA(t, "Flux CA")
	return &fluxPKI{
		CA: ca,
		Agent: ca.issue(t, tlsLeaf{CommonName: "flux-agent", DNSNames: []string{"flux-agent"},
			Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}),
		// wire.md: Flux's certificate is usable for client and server auth.
		Client: ca.issue(t, tlsLeaf{CommonName: "flux", DNSNames: []string{"flux"},
			Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}),
	}
}

// writeAgentFiles writes the agent's files the way Flux does: ca.pem,
// agent.pem and agent-key.pem (0600) in dir.
func (p *fluxPKI) writeAgentFiles(t testing.TB, dir string) {
	t.Helper()
	for name, body := range map[string][]byte{"ca.pem": p.CA.PEM, "agent.pem": p.Agent.CertPEM, "agent-key.pem": p.Agent.KeyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), body, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// clientConfig is the TLS setup of a Flux client presenting cert: it
// verifies the agent against Flux's CA under the name flux-agent.
func (p *fluxPKI) clientConfig(certs ...tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: certs, RootCAs: p.CA.Pool, ServerName: "flux-agent"}
}

// presenting makes cfg offer cert whatever CAs the server asks for.
func presenting(cfg *tls.Config, cert tls.Certificate) *tls.Config {
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return cfg
}

func tlsYAML(caCert, certFile, keyFile string) string {
	return fmt.Sprintf("tls:\n  enabled: true\n  ca_cert: %s\n  cert_file: %s\n  key_file: %s\n", caCert, certFile, keyFile)
}

// rawTLSExchange dials the agent with cfg (ALPN h2), completes the
// handshake and reads the first bytes the agent sends. A TLS 1.3 server
// judges the client certificate after the client's handshake has already
// returned, so a refusal may only show on that first read. An accepted
// connection gets the agent's HTTP/2 SETTINGS frame; a refused one gets an
// error (an alert or a closed connection), never a timeout.
func rawTLSExchange(t testing.TB, addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	t.Helper()
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", addr, cfg)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	state := conn.ConnectionState()
	// The HTTP/2 client preface lets a server that waits for it answer too.
	if _, err := conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); err != nil {
		return state, err
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 9) // one HTTP/2 frame header
	if _, err := conn.Read(buf); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("agent neither answered nor refused within 10s: %v", err)
		}
		return state, err
	}
	if buf[3] != 0x4 { // frame type SETTINGS
		return state, fmt.Errorf("first frame from the agent is type %#x, not SETTINGS", buf[3])
	}
	return state, nil
}

// TestTLSMutual runs the agent with certificates minted like Flux's and
// checks who gets in.
func TestTLSMutual(t *testing.T) {
	rs := startRedis(t)
	pki := newFluxPKI(t)
	certDir := t.TempDir()
	pki.writeAgentFiles(t, certDir)
	a := startAgent(t, rs, agentOptions{YAML: tlsYAML(
		filepath.Join(certDir, "ca.pem"), filepath.Join(certDir, "agent.pem"), filepath.Join(certDir, "agent-key.pem"))})
	flux := pki.clientConfig(pki.Client.TLS)

	t.Run("Flux drives every step over mTLS", func(t *testing.T) {
		c := fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(flux)))
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
		if err != nil || !h.GetHealthy() {
			t.Fatalf("HealthCheck over mTLS = %v, %v; want healthy", h, err)
		}
		st, err := c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{})
		if err != nil || st.GetAgentId() == "" {
			t.Fatalf("ReportNodeStatus over mTLS = %v, %v", st, err)
		}
		install(t, c, fn{Name: "tls-echo", Script: `echo "over tls: $1"` + "\n"})
		resp, id := execSync(t, c, "tls-echo", "hello")
		if resp.GetError() != "" || string(resp.GetOutput()) != "over tls: hello\n" {
			t.Fatalf("ExecuteFunction over mTLS = error %q output %q", resp.GetError(), resp.GetOutput())
		}
		if rec := getRecord(t, c, id); rec == nil || rec.Status != "success" {
			t.Errorf("record over mTLS: %+v", rec)
		}
	})

	t.Run("handshake is h2 over TLS 1.2 or later with the agent's certificate", func(t *testing.T) {
		state, err := rawTLSExchange(t, a.Addr, flux)
		if err != nil {
			t.Fatalf("Flux's handshake refused: %v", err)
		}
		if state.NegotiatedProtocol != "h2" {
			t.Errorf("ALPN protocol = %q, want h2 (Flux refuses peers without it)", state.NegotiatedProtocol)
		}
		if state.Version < tls.VersionTLS12 {
			t.Errorf("TLS version = %s, want 1.2 or later", tls.VersionName(state.Version))
		}
		if len(state.PeerCertificates) == 0 || !bytes.Equal(state.PeerCertificates[0].Raw, pki.Agent.TLS.Certificate[0]) {
			t.Errorf("the agent did not present agent.pem")
		}
		t.Logf("negotiated %s, ALPN %q", tls.VersionName(state.Version), state.NegotiatedProtocol)
	})

	t.Run("a client capped at TLS 1.2 is served", func(t *testing.T) {
		cfg := flux.Clone()
		cfg.MaxVersion = tls.VersionTLS12
		state, err := rawTLSExchange(t, a.Addr, cfg)
		if err != nil || state.Version != tls.VersionTLS12 {
			t.Fatalf("TLS 1.2 client: version %s, %v", tls.VersionName(state.Version), err)
		}
		assertHealthy(t, fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(cfg))))
	})

	// A Go client only offers a certificate whose issuer is among the CAs
	// the server names, so a stranger's certificate is pushed regardless,
	// as an attacker would.
	strangerUsages := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	stranger := newTLSCA(t, "Another CA").issue(t, tlsLeaf{CommonName: "flux", Usages: strangerUsages})
	impostor := newTLSCA(t, "Flux CA").issue(t, tlsLeaf{CommonName: "flux", Usages: strangerUsages})
	refused := []struct {
		name string
		cfg  *tls.Config
	}{
		{"client certificate from another CA", presenting(pki.clientConfig(), stranger.TLS)},
		{"client certificate from another CA with the same name as Flux's", presenting(pki.clientConfig(), impostor.TLS)},
		{"no client certificate", pki.clientConfig()},
		{"expired client certificate from Flux's CA", pki.clientConfig(pki.CA.issue(t, tlsLeaf{
			CommonName: "flux", NotAfter: time.Now().Add(-time.Hour),
			Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}).TLS)},
		{"TLS 1.1 only", func() *tls.Config {
			cfg := flux.Clone()
			cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
			return cfg
		}()},
	}
	for _, tc := range refused {
		t.Run(tc.name+" is refused", func(t *testing.T) {
			if _, err := rawTLSExchange(t, a.Addr, tc.cfg); err == nil {
				t.Errorf("raw TLS connection was accepted (the agent sent HTTP/2 SETTINGS)")
			} else {
				t.Logf("raw connection refused: %v", err)
			}
			assertRefused(t, fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(tc.cfg))))
		})
	}

	t.Run("plaintext client is refused", func(t *testing.T) {
		assertRefused(t, fluxpb.NewAgentServiceClient(a.dial(t, insecureCreds())))
	})

	// Refused peers did not hurt the agent.
	assertHealthy(t, fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(flux))))
}

// TestTLSRelativePaths checks that tls paths written relative to the config
// file resolve against its folder, not the agent's working directory.
func TestTLSRelativePaths(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	// Rewrite the config the harness made, with the files next to it, and
	// start the agent again. Its working directory is this package's, not
	// the config's folder, so only resolving against the config finds them.
	pki := newFluxPKI(t)
	pki.writeAgentFiles(t, filepath.Dir(a.ConfigPath))
	cfg, err := os.ReadFile(a.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg = []byte(mergeYAML(string(cfg), tlsYAML("ca.pem", "agent.pem", "agent-key.pem")))
	if err := os.WriteFile(a.ConfigPath, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	a.restart(nil)
	assertHealthy(t, fluxpb.NewAgentServiceClient(a.dial(t, tlsCreds(pki.clientConfig(pki.Client.TLS)))))
	assertRefused(t, fluxpb.NewAgentServiceClient(a.dial(t, insecureCreds())))
}

// TestTLSBadFiles starts the binary with TLS files that cannot work: it
// must exit at once with an error naming the key, never serve.
func TestTLSBadFiles(t *testing.T) {
	pki := newFluxPKI(t)
	other := newFluxPKI(t)
	garbage := []byte("this is not PEM\n")
	cases := []struct {
		name    string
		files   map[string][]byte // written into the cert dir
		yaml    string            // the tls block; "" = the three files in the cert dir
		wantKey string
	}{
		{name: "missing CA", files: map[string][]byte{"agent.pem": pki.Agent.CertPEM, "agent-key.pem": pki.Agent.KeyPEM},
			wantKey: "tls.ca_cert"},
		{name: "garbage CA", files: map[string][]byte{"ca.pem": garbage, "agent.pem": pki.Agent.CertPEM, "agent-key.pem": pki.Agent.KeyPEM},
			wantKey: "tls.ca_cert"},
		{name: "missing certificate", files: map[string][]byte{"ca.pem": pki.CA.PEM, "agent-key.pem": pki.Agent.KeyPEM},
			wantKey: "tls.cert_file"},
		{name: "garbage certificate", files: map[string][]byte{"ca.pem": pki.CA.PEM, "agent.pem": garbage, "agent-key.pem": pki.Agent.KeyPEM},
			wantKey: "tls.cert_file"},
		{name: "missing key", files: map[string][]byte{"ca.pem": pki.CA.PEM, "agent.pem": pki.Agent.CertPEM},
			wantKey: "tls.key_file"},
		{name: "garbage key", files: map[string][]byte{"ca.pem": pki.CA.PEM, "agent.pem": pki.Agent.CertPEM, "agent-key.pem": garbage},
			wantKey: "tls.key_file"},
		{name: "key of another certificate", files: map[string][]byte{"ca.pem": pki.CA.PEM, "agent.pem": pki.Agent.CertPEM, "agent-key.pem": other.Agent.KeyPEM},
			wantKey: "tls.key_file"},
		{name: "enabled without a CA", files: map[string][]byte{"agent.pem": pki.Agent.CertPEM, "agent-key.pem": pki.Agent.KeyPEM},
			yaml: "tls:\n  enabled: true\n  cert_file: agent.pem\n  key_file: agent-key.pem\n", wantKey: "tls.ca_cert"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, body := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), body, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			block := tc.yaml
			if block == "" {
				block = tlsYAML(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "agent.pem"), filepath.Join(dir, "agent-key.pem"))
			}
			stdout, stderr, err := runAgentOnce(t, dir, block)
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 1 {
				t.Fatalf("agent exit = %v, want exit status 1\nstderr:\n%s", err, stderr)
			}
			if strings.Contains(stdout+stderr, "flux-agent started") {
				t.Errorf("agent started serving with bad TLS files:\n%s", stderr)
			}
			if !strings.Contains(stderr, tc.wantKey) {
				t.Errorf("stderr does not name %s:\n%s", tc.wantKey, stderr)
			}
			t.Logf("stderr: %s", strings.TrimSpace(stderr))
		})
	}
}

// runAgentOnce runs the binary with a config in dir until it exits by
// itself (60 s at most), returning its output and exit error.
func runAgentOnce(t testing.TB, dir, extraYAML string) (stdout, stderr string, err error) {
	t.Helper()
	cfg := mergeYAML(fmt.Sprintf(`agent_id: e2e-bad-tls
listen_address: 127.0.0.1
port: 0
redis_addr: redis://127.0.0.1:%d
apps_dir: %s
telemetry:
  metrics_address: ""
sandbox:
  scratch_dir: %s
`, freePort(t), filepath.Join(dir, "apps"), dir), extraYAML)
	configPath := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(configPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, agentBinary)
	cmd.Env = []string{"AGENT_CONFIG=" + configPath, "PATH=" + os.Getenv("PATH"), "FLUX_AGENT_NETWORK_PUBLIC_IP_URL="}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("agent still running after 60s with bad TLS files:\n%s", errOut.String())
	}
	return out.String(), errOut.String(), err
}

func assertHealthy(t testing.TB, c fluxpb.AgentServiceClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second) // Flux's HealthCheck deadline
	defer cancel()
	h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
	if err != nil || !h.GetHealthy() {
		t.Fatalf("HealthCheck = %v, %v; want healthy", h, err)
	}
}

// assertRefused checks that an RPC fails at the transport: the call never
// reaches the service.
func assertRefused(t testing.TB, c fluxpb.AgentServiceClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
	if err == nil {
		t.Fatalf("HealthCheck succeeded (%v); want the connection refused", h)
	}
	if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Errorf("HealthCheck error code %s, want Unavailable: %v", code, err)
	}
	t.Logf("RPC refused: %v", err)
}

// bigZip is a code archive holding handler.sh and big.bin, whose data is
// stored as is (the tests give it random, incompressible bytes).
func bigZip(t testing.TB, handler string, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	buf.Grow(len(data) + 4096)
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: "handler.sh", Method: zip.Deflate}
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(handler))
	h = &zip.FileHeader{Name: "big.bin", Method: zip.Store}
	h.SetMode(0o644)
	if w, err = zw.CreateHeader(h); err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestBigMessages checks Flux's largest deploy (a 50 MiB message) goes
// through and messages past the agent's 64 MiB limit are refused cleanly.
func TestBigMessages(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t) // Flux's limits: 50 MiB both ways

	t.Run("50 MiB deployment runs", func(t *testing.T) {
		const name = "big"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if ack, err := c.RegisterFunction(ctx, &fluxpb.FunctionConfig{Name: name, Handler: "handler.sh",
			MaxConcurrency: 5, MaxConcurrencyBehavior: "exit", TimeoutSeconds: 60}); err != nil || !ack.GetSuccess() {
			t.Fatalf("register: %v %v", ack, err)
		}
		handler := "#!/bin/sh\nwc -c < big.bin\nsha256sum big.bin\n"
		// Size the random file so the whole message is exactly 50 MiB.
		const target = 50 << 20
		overhead := proto.Size(&fluxpb.DeploymentPackage{FunctionName: name, CodeArchive: bigZip(t, handler, make([]byte, target-8192))}) - (target - 8192)
		data := make([]byte, target-overhead)
		rand.Read(data)
		pkg := &fluxpb.DeploymentPackage{FunctionName: name, CodeArchive: bigZip(t, handler, data)}
		if size := proto.Size(pkg); size != target {
			t.Fatalf("message is %d bytes, want exactly %d", size, target)
		}
		sum := sha256.Sum256(data)

		ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second) // Flux's DeployFunction deadline
		defer cancel()
		start := time.Now()
		ack, err := c.DeployFunction(ctx, pkg)
		if err != nil || !ack.GetSuccess() {
			t.Fatalf("50 MiB DeployFunction = %v, %v", ack, err)
		}
		t.Logf("50 MiB deploy took %s: %s", time.Since(start).Round(time.Millisecond), ack.GetMessage())

		resp, _ := execSync(t, c, name)
		want := fmt.Sprintf("%d\n%s  big.bin\n", len(data), hex.EncodeToString(sum[:]))
		if resp.GetError() != "" || string(resp.GetOutput()) != want {
			t.Errorf("function output %q (error %q), want %q", resp.GetOutput(), resp.GetError(), want)
		}
	})

	t.Run("above 64 MiB is refused and the agent keeps serving", func(t *testing.T) {
		const name = "too-big"
		install(t, c, fn{Name: name, Script: "echo still here\n"})
		conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecureCreds()),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(128<<20), grpc.MaxCallRecvMsgSize(128<<20)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		big := fluxpb.NewAgentServiceClient(conn)
		const limit = 64 << 20
		deploy := func(size int) (*fluxpb.DeploymentAck, error) {
			// Not a zip: only its size matters here.
			pkg := &fluxpb.DeploymentPackage{FunctionName: name, CodeArchive: make([]byte, size)}
			for got := proto.Size(pkg); got != size; got = proto.Size(pkg) {
				pkg.CodeArchive = make([]byte, len(pkg.CodeArchive)-(got-size))
			}
			if got := proto.Size(pkg); got != size {
				t.Fatalf("message is %d bytes, want %d", got, size)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return big.DeployFunction(ctx, pkg)
		}

		ack, err := deploy(limit + 1)
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("DeployFunction of 64 MiB + 1 byte = %v, %v; want ResourceExhausted", ack, err)
		} else {
			t.Logf("64 MiB + 1: %v", err)
		}
		// Exactly 64 MiB passes the transport and is judged by the agent.
		ack, err = deploy(limit)
		if err != nil || ack.GetSuccess() {
			t.Errorf("DeployFunction of exactly 64 MiB of garbage = %v, %v; want a refusal in the ack, not a gRPC error", ack, err)
		}
		assertHealthy(t, big)
		assertHealthy(t, c)
		if resp, _ := execSync(t, c, name); string(resp.GetOutput()) != "still here\n" {
			t.Errorf("the previous deployment is damaged: %q %q", resp.GetOutput(), resp.GetError())
		}
	})
}
