// Package e2e builds the real flux-agent binary, starts it against a real
// redis-server on loopback and drives it over gRPC the way Flux does.
package e2e

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/serverless-fabric/flux-agent/e2e/internal/testredis"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// agentBinary is the flux-agent built once for the whole package, with the
// race detector, so e2e runs also look for races in the agent.
var agentBinary string

// helperMains are other mains of the test binary, chosen by its first
// argument: the binary doubles as a tool that functions run.
var helperMains = map[string]func(args []string) int{}

func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		if main, ok := helperMains[os.Args[1]]; ok {
			os.Exit(main(os.Args[2:]))
		}
	}
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	// Functions see a /tmp of their own (as root, with mount namespaces):
	// apps dirs, triggers and every other file a test shares with its
	// functions must live elsewhere. All temp dirs of the run go under one
	// dir, removed at the end.
	parent := os.TempDir()
	if os.Geteuid() == 0 {
		parent = "/var/lib/flux-agent-tests"
		if err := os.MkdirAll(parent, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	dir, err := os.MkdirTemp(parent, "e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Setenv("TMPDIR", dir)
	if os.Getenv(externalAgentEnv) != "" {
		// A benchmark against an agent that runs already (the .deb's VM):
		// nothing to build.
		return m.Run()
	}
	agentBinary = filepath.Join(dir, "flux-agent")
	build := exec.Command("go", "build", "-race", "-o", agentBinary, "-ldflags", "-X main.version=e2e-test", "..")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build flux-agent:", err)
		return 1
	}
	return m.Run()
}

// redisServer is a real redis-server on a free loopback port, stopped at
// the end of the test.
type redisServer struct {
	Addr   string
	Client *redis.Client
}

func startRedis(t testing.TB) *redisServer {
	t.Helper()
	s := testredis.Start(t)
	return &redisServer{Addr: s.Addr, Client: s.Client}
}

func freePort(t testing.TB) int { return testredis.FreePort(t) }

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// externalAgentEnv names a running agent's gRPC address for the
// benchmarks to measure instead of starting their own.
const externalAgentEnv = "FLUX_E2E_AGENT_ADDR"

// agentCount numbers the agents of the run: each has an id (and so a
// network table) of its own.
var agentCount atomic.Int64

// uidBlocks hands each agent of the run a uid range of its own; the
// sandbox's tests, which may run at the same time, use another part of
// the uid space.
var uidBlocks atomic.Uint32

func nextUIDRange() string {
	const size = 256
	first := 3_100_000 + uidBlocks.Add(size) - size
	return fmt.Sprintf("%d-%d", first, first+size-1)
}

// testNetwork is the network policy of test agents: filtered as in
// production, or host where the tests cannot install one (not root).
func testNetwork() string {
	if os.Geteuid() != 0 {
		return "host"
	}
	return "filtered"
}

// agentOptions shape one agent process.
type agentOptions struct {
	// YAML is appended to the generated config (ports, Redis, apps dir).
	YAML string
	// Env is added to the agent's environment.
	Env []string
	// AppsDir, if set, is reused (to restart an agent over the same state).
	AppsDir string
	AgentID string
	// ExtraFiles are inherited by the agent as fds 3, 4, … (as a careless
	// supervisor's would be).
	ExtraFiles []*os.File
	// Wrap is a command the agent's binary is appended to and run by
	// (nsenter into a test's network namespace).
	Wrap []string
}

// agent is one running flux-agent process.
type agent struct {
	t          testing.TB
	cmd        *exec.Cmd
	Addr       string
	MetricsURL string
	AppsDir    string
	ConfigPath string
	logs       *syncBuffer
	extraFiles []*os.File
	wrap       []string
	exited     chan struct{}
	exitErr    error

	// AdminSocket is where the agent serves its admin endpoint ("" when
	// off).
	AdminSocket string
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startAgent runs the built binary against redis and waits until it
// listens; the real address is read from its start-up log line.
func startAgent(t testing.TB, rs *redisServer, opts agentOptions) *agent {
	t.Helper()
	dir := t.TempDir()
	// Functions run as flux-runner when the tests are root: it must be able
	// to reach the apps dir, as it can /var/lib/flux-agent/apps.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	if opts.AppsDir == "" {
		opts.AppsDir = filepath.Join(dir, "apps")
	}
	if opts.AgentID == "" {
		opts.AgentID = fmt.Sprintf("e2e-%d-%d", os.Getpid(), agentCount.Add(1))
	}
	// Each agent's admin socket apart from the host's, in a short path
	// (sun_path holds 107 bytes).
	adminDir, err := os.MkdirTemp("", "adm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(adminDir) })
	cfg := fmt.Sprintf(`agent_id: %s
listen_address: 127.0.0.1
port: 0
redis_addr: redis://%s
apps_dir: %s
telemetry:
  metrics_address: "127.0.0.1:0"
sandbox:
  scratch_dir: %s
  uid_range: %s
  network: %s
log:
  level: debug
admin:
  socket: %s
`, opts.AgentID, rs.Addr, opts.AppsDir, dir, nextUIDRange(), testNetwork(), filepath.Join(adminDir, "admin.sock"))
	cfg = mergeYAML(cfg, opts.YAML)
	configPath := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(configPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	a := &agent{t: t, AppsDir: opts.AppsDir, ConfigPath: configPath, logs: &syncBuffer{}, extraFiles: opts.ExtraFiles, wrap: opts.Wrap, exited: make(chan struct{})}
	a.start(opts.Env)
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("agent log:\n%s", a.logs.String())
		}
	})
	return a
}

// mergeYAML appends extra to base, replacing base's top-level blocks that
// extra redefines (good enough for the flat configs tests write).
func mergeYAML(base, extra string) string {
	if extra == "" {
		return base
	}
	redefined := map[string]bool{}
	for _, line := range strings.Split(extra, "\n") {
		if line != "" && line[0] != ' ' {
			key, _, _ := strings.Cut(line, ":")
			redefined[key] = true
		}
	}
	var out []string
	skipping := false
	for _, line := range strings.Split(base, "\n") {
		if line != "" && line[0] != ' ' {
			key, _, _ := strings.Cut(line, ":")
			skipping = redefined[key]
		}
		if !skipping {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n") + "\n" + extra
}

func (a *agent) start(env []string) {
	t := a.t
	pr, pw := io.Pipe()
	cmd := exec.Command(agentBinary)
	if len(a.wrap) > 0 {
		cmd = exec.Command(a.wrap[0], append(a.wrap[1:], agentBinary)...)
	}
	cmd.Env = append([]string{"AGENT_CONFIG=" + a.ConfigPath, "PATH=" + os.Getenv("PATH"),
		"FLUX_AGENT_NETWORK_PUBLIC_IP_URL="}, env...)
	cmd.Stdout = io.MultiWriter(a.logs, pw)
	cmd.Stderr = cmd.Stdout
	cmd.ExtraFiles = a.extraFiles
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a.cmd = cmd
	a.exited = make(chan struct{})
	go func() {
		a.exitErr = cmd.Wait()
		pw.Close()
		close(a.exited)
	}()
	started := make(chan map[string]any, 1)
	go func() {
		scanner := bufio.NewScanner(pr)
		scanner.Buffer(make([]byte, 1<<20), 1<<20)
		for scanner.Scan() {
			var line map[string]any
			if json.Unmarshal(scanner.Bytes(), &line) == nil && line["msg"] == "flux-agent started" {
				started <- line
				break
			}
		}
		io.Copy(io.Discard, pr)
	}()
	select {
	case line := <-started:
		a.Addr, _ = line["grpc_address"].(string)
		if m, _ := line["metrics_address"].(string); m != "" {
			a.MetricsURL = "http://" + m
		}
		a.AdminSocket, _ = line["admin"].(string)
	case <-a.exited:
		t.Fatalf("agent exited at start (%v):\n%s", a.exitErr, a.logs.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("agent did not start:\n%s", a.logs.String())
	}
}

// stop sends SIGTERM and waits for the agent to exit.
func (a *agent) stop() error {
	select {
	case <-a.exited:
		return a.exitErr
	default:
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(60 * time.Second):
		a.cmd.Process.Kill()
		<-a.exited
		a.t.Errorf("agent did not stop within 60s of SIGTERM")
	}
	return a.exitErr
}

// restart stops the agent and starts it again with the same config.
func (a *agent) restart(env []string) {
	a.t.Helper()
	if err := a.stop(); err != nil {
		a.t.Fatalf("agent exit: %v", err)
	}
	a.start(env)
}

// client dials the agent without TLS.
func (a *agent) client(t testing.TB) fluxpb.AgentServiceClient {
	t.Helper()
	return fluxpb.NewAgentServiceClient(a.dial(t, insecure.NewCredentials()))
}

func (a *agent) dial(t testing.TB, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(50<<20), grpc.MaxCallSendMsgSize(50<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func tlsCreds(cfg *tls.Config) credentials.TransportCredentials { return credentials.NewTLS(cfg) }

// zipOf builds a code archive; names ending in ".sh" or listed as
// executable get mode 0755.
func zipOf(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range files {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, body)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fn describes a function for install.
type fn struct {
	Name   string
	Script string // body of handler.sh (a #!/bin/sh line is added)
	Config *fluxpb.FunctionConfig
	Files  map[string]string
}

// install registers and deploys a shell function the way Flux does.
func install(t testing.TB, c fluxpb.AgentServiceClient, f fn) {
	t.Helper()
	cfg := f.Config
	if cfg == nil {
		cfg = &fluxpb.FunctionConfig{}
	}
	cfg.Name = f.Name
	if cfg.Handler == "" {
		cfg.Handler = "handler.sh"
	}
	if cfg.MaxConcurrency == 0 {
		cfg.MaxConcurrency = 5 // what Flux sends when the user set none
	}
	if cfg.MaxConcurrencyBehavior == "" {
		cfg.MaxConcurrencyBehavior = "exit"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := c.RegisterFunction(ctx, cfg)
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("register %s: %v %v", f.Name, err, ack)
	}
	files := map[string]string{"handler.sh": "#!/bin/sh\n" + f.Script}
	for k, v := range f.Files {
		files[k] = v
	}
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dack, err := c.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: f.Name, CodeArchive: zipOf(t, files)})
	if err != nil || !dack.GetSuccess() {
		t.Fatalf("deploy %s: %v %v", f.Name, err, dack)
	}
}

var idSeq struct {
	sync.Mutex
	n int
}

// newID returns an execution id shaped like Flux's (exc- + a UUID-ish).
func newID() string {
	idSeq.Lock()
	defer idSeq.Unlock()
	idSeq.n++
	return fmt.Sprintf("exc-%08x-0000-4000-8000-%012d", os.Getpid(), idSeq.n)
}

func execSync(t testing.TB, c fluxpb.AgentServiceClient, name string, args ...string) (*fluxpb.ExecutionResponse, string) {
	t.Helper()
	id := newID()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, Args: args, ExecutionId: id})
	if err != nil {
		t.Fatalf("execute %s: %v", name, err)
	}
	return resp, id
}

func execAsync(t testing.TB, c fluxpb.AgentServiceClient, name string, args ...string) string {
	t.Helper()
	id := newID()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, Args: args, ExecutionId: id, Async: true})
	if err != nil {
		t.Fatalf("execute async %s: %v", name, err)
	}
	if resp.GetError() != "" {
		t.Logf("async %s answered error %q", id, resp.GetError())
	}
	return id
}

// record is the execution record as Flux decodes it, plus extras.
type record struct {
	ExecutionID     string  `json:"execution_id"`
	AgentID         string  `json:"agent_id"`
	FunctionName    string  `json:"function_name"`
	Status          string  `json:"status"`
	Output          string  `json:"output"`
	Error           string  `json:"error"`
	DurationMS      int64   `json:"duration_ms"`
	StartedAt       string  `json:"started_at"`
	StatusAt        *string `json:"status_at"`
	Queued          bool    `json:"queued"`
	ExitCode        *int    `json:"exit_code"`
	OutputTruncated bool    `json:"output_truncated"`
	OutputBytes     int64   `json:"output_bytes"`
	OOMKilled       bool    `json:"oom_killed"`
	TimedOut        bool    `json:"timed_out"`
	CodeVersion     string  `json:"code_version"`
	raw             map[string]any
}

// getRecord returns the record, or nil when the agent says not found.
func getRecord(t testing.TB, c fluxpb.AgentServiceClient, id string) *record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: id})
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	if !resp.GetFound() {
		return nil
	}
	var r record
	if err := json.Unmarshal(resp.GetData(), &r); err != nil {
		t.Fatalf("record %s is not JSON: %v: %s", id, err, resp.GetData())
	}
	json.Unmarshal(resp.GetData(), &r.raw)
	return &r
}

// waitRecord polls GetExecution until cond holds, like Flux polling
// GET /executions/{id}.
func waitRecord(t testing.TB, c fluxpb.AgentServiceClient, id string, timeout time.Duration, what string, cond func(r *record) bool) *record {
	t.Helper()
	var last *record
	if !waitUntil(timeout, func() bool {
		last = getRecord(t, c, id)
		return last != nil && cond(last)
	}) {
		t.Fatalf("execution %s: %s not reached within %s; last record: %+v", id, what, timeout, last)
	}
	return last
}

func isFinal(r *record) bool { return r.Status != "running" }

// trigger is a file a function waits for, so a test decides when it goes on.
type trigger string

func newTrigger(t testing.TB) trigger {
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o777)
	return trigger(filepath.Join(dir, "go"))
}

// waitScript is shell that blocks until the trigger file exists.
func (tr trigger) waitScript() string {
	return fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done\n", string(tr))
}

func (tr trigger) fire(t testing.TB) {
	if err := os.WriteFile(string(tr), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

func insecureCreds() credentials.TransportCredentials { return insecure.NewCredentials() }
