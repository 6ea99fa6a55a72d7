//go:build !windows

// The lifecycle tests run a real redis-server and stop it with SIGSTOP:
// they are built where both exist.

package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/serverless-fabric/flux-agent/nodeinfo"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// testRedis is a real redis-server on a loopback port, killed at the end
// of the test.
type testRedis struct {
	addr   string
	port   int
	dir    string
	cmd    *exec.Cmd
	exited chan struct{}
	// client is the test's own view of the data, apart from the service's.
	client *redis.Client
}

func startRedis(t testing.TB) *testRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skipf("redis-server is needed (apt-get install redis-server): %v", err)
	}
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		r := &testRedis{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), port: port, dir: t.TempDir()}
		r.client = redis.NewClient(&redis.Options{Addr: r.addr})
		if logs, ok := r.run(t); !ok {
			r.client.Close()
			if attempt < 3 { // the port was taken between Close and bind
				continue
			}
			t.Fatalf("redis-server exited: %s", logs)
		}
		t.Cleanup(func() {
			r.client.Close()
			r.kill()
		})
		return r
	}
}

// run starts redis-server on r's port, empty, and waits until it answers;
// false when it exited instead.
func (r *testRedis) run(t testing.TB) (string, bool) {
	t.Helper()
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.dir)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	r.cmd, r.exited = cmd, exited
	up := waitFor(10*time.Second, func() bool {
		return isClosed(exited) || r.client.Ping(context.Background()).Err() == nil
	})
	if isClosed(exited) {
		return logs.String(), false
	}
	if !up {
		t.Fatalf("redis-server did not answer: %s", logs.String())
	}
	return "", true
}

// kill ends the server at once, even a stopped one.
func (r *testRedis) kill() {
	r.cmd.Process.Signal(syscall.SIGCONT)
	r.cmd.Process.Kill()
	<-r.exited
}

// restartEmpty kills the server and starts a new one, empty, on the same
// port: Redis restarted without persistence.
func (r *testRedis) restartEmpty(t testing.TB) {
	t.Helper()
	r.kill()
	if logs, ok := r.run(t); !ok {
		t.Fatalf("redis-server did not restart: %s", logs)
	}
}

// stop and resume stall the server (SIGSTOP, SIGCONT).
func (r *testRedis) stop(t testing.TB) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
}

func (r *testRedis) resume(t testing.TB) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
}

// newClient is a client as the agent configures its own.
func (r *testRedis) newClient(t testing.TB, hooks ...redis.Hook) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.addr, ContextTimeoutEnabled: true, MaxRetries: -1})
	for _, h := range hooks {
		c.AddHook(h)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// commandCalls reads the server's count of each command since start.
func (r *testRedis) commandCalls(t testing.TB) map[string]int {
	t.Helper()
	info, err := r.client.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int{}
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":calls=")
		if !ok {
			continue
		}
		n, _, _ := strings.Cut(rest, ",")
		calls[strings.TrimPrefix(name, "cmdstat_")], _ = strconv.Atoi(n)
	}
	return calls
}

// roundTrips counts the round trips a client makes: one per command sent
// alone, one per pipeline.
type roundTrips struct{ n atomic.Int64 }

func (*roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmd)
	}
}

func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmds)
	}
}

// script is what a fake process does once resumed: it may write to out
// and wait on cancel, and returns how it ended.
type script func(out io.Writer, cancel <-chan struct{}) sandbox.Result

func exits(code int, output string) script {
	return func(out io.Writer, _ <-chan struct{}) sandbox.Result {
		io.WriteString(out, output)
		return sandbox.Result{ExitCode: code, WallTime: time.Millisecond}
	}
}

// runsUntilCancelled prints output, then runs until it is killed.
func runsUntilCancelled(output string) script {
	return func(out io.Writer, cancel <-chan struct{}) sandbox.Result {
		io.WriteString(out, output)
		<-cancel
		return sandbox.Result{ExitCode: 137, Signal: 9, Cancelled: true}
	}
}

// fakeSandbox starts fake processes that run a script per function (by
// the handler's path), held until Resume as the real sandbox's are.
type fakeSandbox struct {
	mu      sync.Mutex
	scripts map[string]script
	started []*fakeProcess
	// gate, when set, holds Start until it is closed.
	gate chan struct{}
	// starting receives each spec as Start begins.
	starting chan sandbox.Spec
	// runsAtOnce makes processes run without waiting for Resume, as
	// today's sandbox does until it can hold them.
	runsAtOnce bool
	// usageErr, when set, is what Usage of the processes started next
	// fails with while they run.
	usageErr error
}

// fakeUsage is what a running fake process has used.
var fakeUsage = sandbox.Usage{UID: 3_100_007, MemoryBytes: 12 << 20, CPUTime: 1500 * time.Millisecond}

func newFakeSandbox() *fakeSandbox { return &fakeSandbox{scripts: map[string]script{}} }

func (f *fakeSandbox) setScript(function string, s script) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.scripts["/code/"+function+"/handler"] = s
}

func (f *fakeSandbox) Start(ctx context.Context, spec sandbox.Spec) (Process, error) {
	f.mu.Lock()
	gate, starting, run, atOnce, usageErr := f.gate, f.starting, f.scripts[spec.Path], f.runsAtOnce, f.usageErr
	f.mu.Unlock()
	if starting != nil {
		starting <- spec
	}
	if gate != nil {
		<-gate
	}
	if run == nil {
		return nil, fmt.Errorf("%w: no script for %s", sandbox.ErrInvalidSpec, spec.Path)
	}
	p := &fakeProcess{spec: spec, resumed: make(chan struct{}), cancel: make(chan struct{}), done: make(chan struct{}), usageErr: usageErr}
	if atOnce {
		p.Resume()
	}
	f.mu.Lock()
	f.started = append(f.started, p)
	f.mu.Unlock()
	go p.live(run)
	return p, nil
}

// processes returns the processes started so far, in order.
func (f *fakeSandbox) processes() []*fakeProcess {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fakeProcess(nil), f.started...)
}

// fakeProcess is one fake execution; ran says whether the function ran a
// single instruction (it was resumed before being cancelled).
type fakeProcess struct {
	spec       sandbox.Spec
	resumeOnce sync.Once
	cancelOnce sync.Once
	resumed    chan struct{}
	cancel     chan struct{}
	done       chan struct{}
	ran        atomic.Bool
	result     sandbox.Result
	usageErr   error
}

func (p *fakeProcess) live(run script) {
	defer close(p.done)
	select {
	case <-p.cancel:
		p.result = sandbox.Result{ExitCode: 137, Signal: 9, Cancelled: true}
		return
	case <-p.resumed:
	}
	select {
	case <-p.cancel: // both ready: a cancel before Resume wins
		p.result = sandbox.Result{ExitCode: 137, Signal: 9, Cancelled: true}
		return
	default:
	}
	p.ran.Store(true)
	p.result = run(p.spec.Output, p.cancel)
}

func (p *fakeProcess) Pid() int               { return 4242 }
func (p *fakeProcess) Done() <-chan struct{}  { return p.done }
func (p *fakeProcess) Result() sandbox.Result { <-p.done; return p.result }
func (p *fakeProcess) Cancel()                { p.cancelOnce.Do(func() { close(p.cancel) }) }
func (p *fakeProcess) Resume() error          { p.resumeOnce.Do(func() { close(p.resumed) }); return nil }
func (p *fakeProcess) wasResumed() bool       { return isClosed(p.resumed) }
func (p *fakeProcess) env(key string) string  { return envValue(p.spec.Env, key) }

// Usage is fakeUsage while the process runs, as the sandbox's: an error
// wrapping sandbox.ErrExecutionOver once it is done.
func (p *fakeProcess) Usage() (sandbox.Usage, error) {
	switch {
	case isClosed(p.done):
		return sandbox.Usage{}, fmt.Errorf("execution %s: usage: %w", p.spec.ID, sandbox.ErrExecutionOver)
	case p.usageErr != nil:
		return sandbox.Usage{}, p.usageErr
	}
	return fakeUsage, nil
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if k, v, _ := strings.Cut(kv, "="); k == key {
			return v
		}
	}
	return ""
}

// fakeCode has every function deployed at version v1, its handler at
// /code/<function>/handler, and counts the pins held.
type fakeCode struct{ leases atomic.Int64 }

func (c *fakeCode) Checkout(function, handler string) (Code, error) {
	if function == "undeployed" {
		return Code{}, errors.New("function undeployed has no deployed code")
	}
	c.leases.Add(1)
	var once sync.Once
	return Code{Dir: "/code/" + function, Version: "v1", Path: "/code/" + function + "/handler",
		Release: func() { once.Do(func() { c.leases.Add(-1) }) }}, nil
}

type fixedNode struct{}

func (fixedNode) CPUPercent() float64     { return 1 }
func (fixedNode) Memory() nodeinfo.Memory { return nodeinfo.Memory{} }

type fixedIPs struct{}

func (fixedIPs) PrivateIP() string { return "10.0.0.7" }
func (fixedIPs) PublicIP() string  { return "203.0.113.7" }

// harness is a Service on a real Redis with a fake sandbox and code store.
type harness struct {
	svc   *Service
	redis *testRedis
	sb    *fakeSandbox
	code  *fakeCode
	trips *roundTrips
	// unsettledOK says the test leaves records for the next start to settle.
	unsettledOK bool
}

// newHarness starts a Service; change opts before it is built with edit.
// At the end of the test the service is shut down and must hold nothing.
func newHarness(t testing.TB, edit func(*Options)) *harness {
	t.Helper()
	h := &harness{redis: startRedis(t), sb: newFakeSandbox(), code: &fakeCode{}, trips: &roundTrips{}}
	opts := Options{
		AgentID: "agent-test", Version: "test", Redis: h.redis.newClient(t, h.trips),
		ExecutionTTL: time.Hour, OutputLimit: 1 << 20, QueueLimit: 10,
		Node: fixedNode{}, IPs: fixedIPs{},
	}
	if edit != nil {
		edit(&opts)
	}
	svc, err := newService(opts, h.sb, h.code)
	if err != nil {
		t.Fatal(err)
	}
	h.svc = svc
	t.Cleanup(func() {
		svc := h.svc // a test may have replaced it (an agent restart)
		for _, p := range h.sb.processes() {
			p.Cancel() // a test that failed half-way leaves none running
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := svc.Shutdown(ctx); err != nil && !h.unsettledOK {
			t.Errorf("shutdown: %v", err)
		}
		if n := h.code.leases.Load(); n != 0 {
			t.Errorf("%d code pins not released", n)
		}
		if running, queued := svc.slots.counts(); running != 0 || queued != 0 {
			t.Errorf("slots still held: %d running, %d queued", running, queued)
		}
		if !waitFor(5*time.Second, func() bool { return svc.syncOutput.inUse()+svc.replies.inUse() == 0 }) {
			t.Errorf("%d bytes of memory budget not given back", svc.syncOutput.inUse()+svc.replies.inUse())
		}
	})
	return h
}

// register registers a function whose process runs s.
func (h *harness) register(t testing.TB, cfg *fluxpb.FunctionConfig, s script) {
	t.Helper()
	if cfg.Handler == "" {
		cfg.Handler = "handler"
	}
	ack, err := h.svc.RegisterFunction(context.Background(), cfg)
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("register %s: %v %v", cfg.GetName(), ack, err)
	}
	h.sb.setScript(cfg.GetName(), s)
}

func (h *harness) execute(t testing.TB, function, id string, async bool) (*fluxpb.ExecutionResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return h.svc.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: function, ExecutionId: id, Async: async})
}

// record reads an execution's record through GetExecution, or nil.
func (h *harness) record(t testing.TB, id string) *Record {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // the call is over: its reply's memory goes back
	resp, err := h.svc.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: id})
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	if !resp.GetFound() {
		return nil
	}
	var rec Record
	if err := json.Unmarshal(resp.GetData(), &rec); err != nil {
		t.Fatalf("record %s: %v", id, err)
	}
	return &rec
}

// waitRecord waits until the record of id satisfies cond.
func (h *harness) waitRecord(t testing.TB, id string, what string, cond func(*Record) bool) *Record {
	t.Helper()
	var rec *Record
	if !waitFor(5*time.Second, func() bool {
		rec = h.record(t, id)
		return rec != nil && cond(rec)
	}) {
		t.Fatalf("%s: %s not reached; last record %+v", id, what, rec)
	}
	return rec
}

func isFinal(r *Record) bool { return r.Final() }
