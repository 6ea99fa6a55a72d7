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
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// serveAdmin serves h's AgentService and AdminService over real gRPC on a
// loopback port, as the admin socket does, and returns clients of both.
func (h *harness) serveAdmin(t *testing.T, dialOpts ...grpc.DialOption) (fluxpb.AdminServiceClient, fluxpb.AgentServiceClient) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	fluxpb.RegisterAgentServiceServer(srv, h.svc)
	fluxpb.RegisterAdminServiceServer(srv, h.svc.Admin(AdminInfo{Commit: "abc"}))
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(l)
	}()
	dialOpts = append(dialOpts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient(l.Addr().String(), dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-served
	})
	return fluxpb.NewAdminServiceClient(conn), fluxpb.NewAgentServiceClient(conn)
}

// steps is a function that writes each of parts in turn, waiting for the
// test between them, and exits with code.
type steps struct {
	next chan struct{}
}

func newSteps() *steps { return &steps{next: make(chan struct{})} }

func (s *steps) script(code int, parts ...string) script {
	return func(out io.Writer, cancel <-chan struct{}) sandbox.Result {
		for i, p := range parts {
			if i > 0 {
				select {
				case <-s.next:
				case <-cancel:
					return sandbox.Result{ExitCode: 137, Signal: 9, Cancelled: true}
				}
			}
			io.WriteString(out, p)
		}
		return sandbox.Result{ExitCode: code, WallTime: time.Millisecond}
	}
}

// release lets the function write its next part.
func (s *steps) release(t *testing.T) {
	t.Helper()
	select {
	case s.next <- struct{}{}:
	case <-time.After(5 * time.Second):
		t.Fatal("the function did not wait for its next step")
	}
}

// tailReader reads a TailExecution stream, checking that every chunk
// starts where the one before ended.
type tailReader struct {
	stream grpc.ServerStreamingClient[fluxpb.TailExecutionResponse]
	pos    int64
	out    bytes.Buffer
	end    *fluxpb.ExecutionEnd
}

func tailFrom(t *testing.T, ctx context.Context, c fluxpb.AdminServiceClient, id string, offset int64, follow bool) *tailReader {
	t.Helper()
	stream, err := c.TailExecution(ctx, &fluxpb.TailExecutionRequest{ExecutionId: id, Offset: offset, Follow: follow})
	if err != nil {
		t.Fatal(err)
	}
	return &tailReader{stream: stream, pos: offset}
}

// readUntil reads until the output holds want (or the stream ends).
func (r *tailReader) readUntil(t *testing.T, want string) {
	t.Helper()
	for !strings.Contains(r.out.String(), want) {
		if !r.next(t) {
			t.Fatalf("stream ended before %q; got %q", want, r.out.String())
		}
	}
}

// next reads one message; false once the end came.
func (r *tailReader) next(t *testing.T) bool {
	t.Helper()
	msg, err := r.stream.Recv()
	if err != nil {
		t.Fatalf("tail: %v (after %q)", err, r.out.String())
	}
	switch ev := msg.GetEvent().(type) {
	case *fluxpb.TailExecutionResponse_Output:
		if ev.Output.GetOffset() != r.pos {
			t.Fatalf("chunk at offset %d, want %d", ev.Output.GetOffset(), r.pos)
		}
		r.out.Write(ev.Output.GetData())
		r.pos += int64(len(ev.Output.GetData()))
		return true
	case *fluxpb.TailExecutionResponse_End:
		r.end = ev.End
		if _, err := r.stream.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("after the end: %v, want EOF", err)
		}
		return false
	}
	t.Fatalf("unexpected message %v", msg)
	return false
}

func (r *tailReader) readAll(t *testing.T) {
	t.Helper()
	for r.next(t) {
	}
}

func (r *tailReader) record(t *testing.T) Record {
	t.Helper()
	var rec Record
	if err := json.Unmarshal(r.end.GetRecord(), &rec); err != nil {
		t.Fatalf("end record: %v: %s", err, r.end.GetRecord())
	}
	return rec
}

func TestTailFollowsLiveFromMemoryThenEnds(t *testing.T) {
	h := newHarness(t, nil)
	admin, _ := h.serveAdmin(t)
	fn := newSteps()
	h.register(t, &fluxpb.FunctionConfig{Name: "live"}, fn.script(3, "one\n", "two\n", "three\n"))
	if _, err := h.execute(t, "live", "exc-live", true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := tailFrom(t, ctx, admin, "exc-live", 0, true)
	r.readUntil(t, "one\n")

	// Redis frozen: the next part can only come from the agent's memory.
	if err := h.redis.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	fn.release(t)
	r.readUntil(t, "two\n")
	if err := h.redis.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	fn.release(t)
	r.readAll(t)
	if got := r.out.String(); got != "one\ntwo\nthree\n" {
		t.Errorf("output %q", got)
	}
	rec := r.record(t)
	if !r.end.GetFinal() || rec.Status != StatusFailed || rec.ExitCode == nil || *rec.ExitCode != 3 || rec.Output != "" {
		t.Errorf("end %v, record %+v", r.end.GetFinal(), rec)
	}
}

// TestTailReconnectLosesAndRepeatsNothing cuts a tail half-way, at a
// point of the client's choosing, and resumes it from the bytes it got:
// while the execution runs (memory and Redis meet) and after it ended
// (Redis alone).
func TestTailReconnectLosesAndRepeatsNothing(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.OutputLimit = 16 << 20 })
	admin, _ := h.serveAdmin(t)
	fn := newSteps()
	var parts []string
	for i := range 4 {
		// Larger than a chunk, so chunks split each part.
		parts = append(parts, strings.Repeat(fmt.Sprintf("part %d line\n", i), 30_000))
	}
	h.register(t, &fluxpb.FunctionConfig{Name: "big"}, fn.script(0, parts...))
	if _, err := h.execute(t, "big", "exc-big", true); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	// First connection: a part and a bit, then the client goes away.
	ctx1, cancel1 := context.WithCancel(context.Background())
	r := tailFrom(t, ctx1, admin, "exc-big", 0, true)
	r.readUntil(t, "part 0 line\n")
	fn.release(t)
	r.readUntil(t, "part 1 line\n")
	cancel1()
	got.Write(r.out.Bytes())

	// Second: from what it has, while the function runs on.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	r = tailFrom(t, ctx2, admin, "exc-big", int64(got.Len()), true)
	fn.release(t)
	r.readUntil(t, "part 2 line\n")
	mid := int64(got.Len()) + int64(r.out.Len()) - 7 // cut inside a line
	fn.release(t)
	r.readAll(t)
	want := strings.Join(parts, "")
	got.Write(r.out.Bytes())
	if got.String() != want {
		t.Fatalf("output after a reconnect: %d bytes, want %d (equal prefix %d)", got.Len(), len(want), commonPrefix(got.String(), want))
	}

	// Third: after the end, from inside a line, from Redis.
	r = tailFrom(t, ctx2, admin, "exc-big", mid, false)
	r.readAll(t)
	if r.out.String() != want[mid:] || !r.end.GetFinal() {
		t.Errorf("tail of a finished execution from %d: %d bytes, want %d", mid, r.out.Len(), len(want)-int(mid))
	}
	if rec := h.record(t, "exc-big"); rec.Output != want {
		t.Errorf("stored output differs from the tail's")
	}
}

func commonPrefix(a, b string) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

// TestTailSlowClientCatchesUpFromRedis has a function write far more than
// a tail buffers while the client reads nothing: the tail drops its buffer
// and goes on from Redis, without a gap.
func TestTailSlowClientCatchesUpFromRedis(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.OutputLimit = 16 << 20 })
	// A fixed window: gRPC does not take in more than it for a client
	// that does not read.
	admin, _ := h.serveAdmin(t, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	fn := newSteps()
	big := strings.Repeat("0123456789abcdef", (6<<20)/16)
	h.register(t, &fluxpb.FunctionConfig{Name: "flood"}, fn.script(0, "start\n", big))
	if _, err := h.execute(t, "flood", "exc-flood", true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := tailFrom(t, ctx, admin, "exc-flood", 0, true)
	r.readUntil(t, "start\n")
	fn.release(t) // 6 MiB while the client does not read
	h.waitRecord(t, "exc-flood", "final", isFinal)
	r.readAll(t)
	if r.out.String() != "start\n"+big {
		t.Fatalf("%d bytes, want %d (equal prefix %d)", r.out.Len(), len(big)+6, commonPrefix(r.out.String(), "start\n"+big))
	}
}

func TestTailWithoutFollowAndUnknown(t *testing.T) {
	h := newHarness(t, nil)
	admin, _ := h.serveAdmin(t)
	fn := newSteps()
	h.register(t, &fluxpb.FunctionConfig{Name: "slow"}, fn.script(0, "so far\n", "later\n"))
	if _, err := h.execute(t, "slow", "exc-slow", true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h.waitRecord(t, "exc-slow", "output", func(r *Record) bool { return r.Output == "so far\n" })
	r := tailFrom(t, ctx, admin, "exc-slow", 0, false)
	r.readAll(t)
	if r.out.String() != "so far\n" || r.end.GetFinal() || r.record(t).Status != StatusRunning {
		t.Errorf("tail without follow of a running execution: %q final=%v %+v", r.out.String(), r.end.GetFinal(), r.record(t))
	}
	fn.release(t)
	h.waitRecord(t, "exc-slow", "final", isFinal)

	stream, err := admin.TailExecution(ctx, &fluxpb.TailExecutionRequest{ExecutionId: "exc-nobody", Follow: true})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != grpccodes.NotFound {
		t.Errorf("unknown id: %v, want NotFound", err)
	}
	stream, err = admin.TailExecution(ctx, &fluxpb.TailExecutionRequest{ExecutionId: "exc-slow", Offset: -1})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != grpccodes.InvalidArgument {
		t.Errorf("negative offset: %v, want InvalidArgument", err)
	}
}

// TestDrain: new executions are refused the way Flux handles best, running
// ones finish, HealthCheck says unhealthy, and undrain undoes it.
func TestDrain(t *testing.T) {
	h := newHarness(t, nil)
	admin, agent := h.serveAdmin(t)
	fn := newSteps()
	h.register(t, &fluxpb.FunctionConfig{Name: "long"}, fn.script(0, "started\n", "done\n"))
	h.register(t, &fluxpb.FunctionConfig{Name: "waits", MaxConcurrency: 5, MaxConcurrencyBehavior: BehaviorWait}, exits(0, "w"))
	h.register(t, &fluxpb.FunctionConfig{Name: "exits", MaxConcurrency: 5, MaxConcurrencyBehavior: BehaviorExit}, exits(0, "e"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := h.execute(t, "long", "exc-long", true); err != nil {
		t.Fatal(err)
	}
	d, err := admin.Drain(ctx, &fluxpb.DrainRequest{})
	if err != nil || d.GetRunning() != 1 {
		t.Fatalf("drain: %v %v", d, err)
	}
	if hc, _ := agent.HealthCheck(ctx, &fluxpb.HealthCheckRequest{}); hc.GetHealthy() {
		t.Error("HealthCheck healthy while draining")
	}
	resp, err := agent.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "exits", ExecutionId: "exc-sync"})
	if err != nil || !strings.Contains(resp.GetError(), "at capacity") || !strings.Contains(resp.GetError(), "draining") {
		t.Errorf("sync while draining: %v %v, want an error with \"at capacity\"", resp, err)
	}
	// Flux retries a wait function's refusal with the same id: no record
	// may stand in its way.
	resp, err = agent.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "waits", ExecutionId: "exc-w", Async: true})
	if err != nil || !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("async wait while draining: %v %v", resp, err)
	}
	if rec := h.record(t, "exc-w"); rec != nil {
		t.Errorf("a refused wait execution left a record: %+v", rec)
	}
	resp, err = agent.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "exits", ExecutionId: "exc-e", Async: true})
	if err != nil || !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("async exit while draining: %v %v", resp, err)
	}
	if rec := h.record(t, "exc-e"); rec == nil || rec.Status != StatusFailed || !strings.Contains(rec.Error, "draining") {
		t.Errorf("a refused exit execution's record: %+v", rec)
	}
	st, err := admin.Status(ctx, &fluxpb.StatusRequest{})
	if err != nil || !st.GetDraining() || st.GetHealthy() || st.GetRunning() != 1 {
		t.Errorf("status while draining: %v %v", st, err)
	}

	fn.release(t) // the running one finishes
	rec := h.waitRecord(t, "exc-long", "final", isFinal)
	if rec.Status != StatusSuccess || rec.Output != "started\ndone\n" {
		t.Errorf("the execution that ran through the drain: %+v", rec)
	}

	if _, err := admin.Undrain(ctx, &fluxpb.UndrainRequest{}); err != nil {
		t.Fatal(err)
	}
	if hc, _ := agent.HealthCheck(ctx, &fluxpb.HealthCheckRequest{}); !hc.GetHealthy() {
		t.Error("HealthCheck unhealthy after undrain")
	}
	resp, err = agent.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "waits", ExecutionId: "exc-w", Async: true})
	if err != nil || resp.GetError() != "" {
		t.Fatalf("Flux's retry after undrain: %v %v", resp, err)
	}
	h.waitRecord(t, "exc-w", "success", func(r *Record) bool { return r.Status == StatusSuccess })
}

func TestDrainDuringShutdownIsRefused(t *testing.T) {
	h := newHarness(t, nil)
	admin, _ := h.serveAdmin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.svc.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Undrain(ctx, &fluxpb.UndrainRequest{}); status.Code(err) != grpccodes.FailedPrecondition {
		t.Errorf("undrain while shutting down: %v", err)
	}
}

func TestListExecutionsAndFunctions(t *testing.T) {
	h := newHarness(t, nil)
	admin, _ := h.serveAdmin(t)
	fn := newSteps()
	limit := int64(64 << 20)
	h.register(t, &fluxpb.FunctionConfig{Name: "one", MaxConcurrency: 1, MaxConcurrencyBehavior: BehaviorWait, MemoryMb: limit >> 20, TimeoutSeconds: 9},
		fn.script(0, "a", "b"))
	h.register(t, &fluxpb.FunctionConfig{Name: "idle", Env: map[string]string{"K": "V"}}, exits(0, ""))
	if _, err := h.execute(t, "one", "exc-first", true); err != nil {
		t.Fatal(err)
	}
	h.waitRecord(t, "exc-first", "output", func(r *Record) bool { return r.Output == "a" })
	if _, err := h.execute(t, "one", "exc-second", true); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := admin.ListExecutions(ctx, &fluxpb.ListExecutionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	ex := list.GetExecutions()
	if len(ex) != 2 || ex[0].GetExecutionId() != "exc-first" || ex[1].GetExecutionId() != "exc-second" {
		t.Fatalf("executions %v", ex)
	}
	if ex[0].GetQueued() || !ex[1].GetQueued() || ex[0].GetFunctionName() != "one" || !ex[0].GetAsync() ||
		ex[0].GetPid() != 4242 || ex[0].GetCodeVersion() != "v1" || ex[0].GetMemoryLimitBytes() != limit ||
		ex[0].GetTimeoutMs() != 9000 || ex[0].GetOutputBytes() != 1 || ex[1].GetPid() != 0 {
		t.Errorf("executions %v", ex)
	}
	if ex[0].GetUid() != int32(fakeUsage.UID) || ex[0].GetMemoryBytes() != fakeUsage.MemoryBytes || ex[0].GetCpuTimeMs() != 1500 ||
		ex[1].GetUid() != 0 || ex[1].GetMemoryBytes() != 0 || ex[1].GetCpuTimeMs() != 0 {
		t.Errorf("figures of the running one and the queued one: %v", ex)
	}

	fl, err := admin.ListFunctions(ctx, &fluxpb.ListFunctionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	fns := fl.GetFunctions()
	if len(fns) != 2 || fns[0].GetConfig().GetName() != "idle" || fns[1].GetConfig().GetName() != "one" ||
		fns[1].GetRunning() != 2 || fns[0].GetRunning() != 0 || fns[1].GetVersion() != "v1" || fns[0].GetConfig().GetEnv()["K"] != "V" {
		t.Errorf("functions %v", fns)
	}
	fn.release(t)
	fn.release(t) // the second one, dequeued
	h.waitRecord(t, "exc-second", "final", isFinal)
}

// TestListExecutionsWithoutUsage lists executions whose usage cannot be
// read: one the sandbox says is over (its pid may be another's by now)
// shows no pid, one it cannot measure its pid without figures.
func TestListExecutionsWithoutUsage(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		wantPid int32
	}{
		{"over", fmt.Errorf("execution x: usage: %w", sandbox.ErrExecutionOver), 0},
		{"unmeasured", errors.New("cgroup file unreadable"), 4242},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			admin, _ := h.serveAdmin(t)
			h.sb.mu.Lock()
			h.sb.usageErr = tc.err
			h.sb.mu.Unlock()
			fn := newSteps()
			h.register(t, &fluxpb.FunctionConfig{Name: "one"}, fn.script(0, "a", "b"))
			if _, err := h.execute(t, "one", "exc-1", true); err != nil {
				t.Fatal(err)
			}
			h.waitRecord(t, "exc-1", "output", func(r *Record) bool { return r.Output == "a" })
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			list, err := admin.ListExecutions(ctx, &fluxpb.ListExecutionsRequest{})
			if err != nil {
				t.Fatal(err)
			}
			ex := list.GetExecutions()
			if len(ex) != 1 || ex[0].GetExecutionId() != "exc-1" || ex[0].GetPid() != tc.wantPid ||
				ex[0].GetUid() != 0 || ex[0].GetMemoryBytes() != 0 || ex[0].GetCpuTimeMs() != 0 {
				t.Errorf("executions %v, want pid %d and no figures", ex, tc.wantPid)
			}
			fn.release(t)
			h.waitRecord(t, "exc-1", "final", isFinal)
		})
	}
}

func TestStatus(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.MaxTasks = 7 })
	admin, _ := h.serveAdmin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := admin.Status(ctx, &fluxpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !st.GetHealthy() || st.GetAgentId() != "agent-test" || st.GetVersion() != "test" || st.GetCommit() != "abc" ||
		st.GetRedisRttUs() <= 0 || st.GetRedisError() != "" || st.GetNode().GetMaxTasks() != 7 || st.GetQueueLimit() != 10 {
		t.Errorf("status %v", st)
	}
	if err := h.redis.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer h.redis.cmd.Process.Signal(syscall.SIGCONT)
	st, err = admin.Status(ctx, &fluxpb.StatusRequest{})
	if err != nil || st.GetHealthy() || st.GetRedisError() == "" || !strings.Contains(st.GetUnhealthyReason(), "redis") {
		t.Errorf("status with Redis frozen: %v %v", st, err)
	}
}
