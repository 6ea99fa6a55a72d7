//go:build !windows

// The lifecycle tests run a real redis-server and stop it with SIGSTOP:
// they are built where both exist.

package service

import (
	"context"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

func TestSyncExecution(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "hello", Env: map[string]string{"GREETING": "hi", "FLUX_EXECUTION_ID": "spoofed"}},
		exits(0, "hello\n"))
	resp, err := h.execute(t, "hello", "exc-1", false)
	if err != nil || resp.GetError() != "" || string(resp.GetOutput()) != "hello\n" {
		t.Fatalf("sync: %v %v", resp, err)
	}
	// A GetExecution after the reply sees the final record.
	rec := h.record(t, "exc-1")
	if rec.Status != StatusSuccess || rec.Output != "hello\n" || rec.CodeVersion != "v1" || rec.StatusAt == nil {
		t.Errorf("record: %+v", rec)
	}
	p := h.sb.processes()[0]
	for k, want := range map[string]string{"GREETING": "hi", "FLUX_EXECUTION_ID": "exc-1",
		"FLUX_NODE_PRIVATE_IP": "10.0.0.7", "FLUX_NODE_PUBLIC_IP": "203.0.113.7", "PATH": "/usr/local/bin:/usr/bin:/bin"} {
		if got := p.env(k); got != want {
			t.Errorf("env %s = %q, want %q", k, got, want)
		}
	}
	if n := strings.Count(strings.Join(p.spec.Env, "\n"), "FLUX_EXECUTION_ID="); n != 1 {
		t.Errorf("FLUX_EXECUTION_ID set %d times: %q", n, p.spec.Env)
	}
}

// A sync and an async no-op each take two round trips to Redis: the claim
// of the id (record and running set, overlapped with the process start)
// and the final write (record, output, running set).
func TestRoundTripsPerExecution(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "noop"}, exits(0, ""))
	for i, async := range []bool{false, true, false, true} {
		id := fmt.Sprintf("exc-noop-%d", i)
		before, calls0 := h.trips.n.Load(), h.redis.commandCalls(t)
		if resp, err := h.execute(t, "noop", id, async); err != nil || resp.GetError() != "" {
			t.Fatalf("%s: %v %v", id, resp, err)
		}
		if !waitFor(5*time.Second, func() bool { return h.svc.ActiveTasks() == 0 }) {
			t.Fatal("the execution did not end")
		}
		trips := h.trips.n.Load() - before
		calls1 := h.redis.commandCalls(t)
		commands := map[string]int{}
		for name, n := range calls1 {
			if d := n - calls0[name]; d > 0 && name != "info" {
				commands[name] = d
			}
		}
		if i < 2 {
			continue // the first of each opens the pool's connections
		}
		t.Logf("async=%v: %d round trips, commands %v", async, trips, commands)
		if trips != 2 {
			t.Errorf("async=%v: %d round trips, want 2", async, trips)
		}
		want := map[string]int{"set": 2, "sadd": 1, "expire": 1, "srem": 1}
		if diff := cmp.Diff(want, commands); diff != "" {
			t.Errorf("async=%v: commands (-want +got):\n%s", async, diff)
		}
	}
}

// An async call returns once the running record exists, while the
// process may still be starting.
func TestAsyncReturnsOnceTheRecordExists(t *testing.T) {
	h := newHarness(t, nil)
	h.sb.gate = make(chan struct{}) // the sandbox is slow to start
	h.register(t, &fluxpb.FunctionConfig{Name: "live"}, runsUntilCancelled("up\n"))
	if resp, err := h.execute(t, "live", "exc-1", true); err != nil || resp.GetError() != "" {
		t.Fatalf("async: %v %v", resp, err)
	}
	if rec := h.record(t, "exc-1"); rec == nil || rec.Status != StatusRunning || rec.Queued {
		t.Fatalf("record right after the call: %+v", rec)
	}
	close(h.sb.gate)
	h.waitRecord(t, "exc-1", "live output", func(r *Record) bool { return r.Output == "up\n" })
	cancelExecution(t, h, "exc-1", true)
}

func cancelExecution(t *testing.T, h *harness, id string, wantSuccess bool) string {
	t.Helper()
	resp, err := h.svc.CancelExecution(context.Background(), &fluxpb.CancelExecutionRequest{ExecutionId: id})
	if err != nil || resp.GetSuccess() != wantSuccess {
		t.Fatalf("cancel %s: %v %v, want success=%v", id, resp, err, wantSuccess)
	}
	return resp.GetMessage()
}

func TestCancelWhileQueued(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "one", MaxConcurrency: 1, MaxConcurrencyBehavior: BehaviorWait},
		runsUntilCancelled(""))
	h.execute(t, "one", "exc-running", true)
	if _, err := h.execute(t, "one", "exc-queued", true); err != nil {
		t.Fatal(err)
	}
	if rec := h.record(t, "exc-queued"); rec.Status != StatusRunning || !rec.Queued {
		t.Fatalf("queued record: %+v", rec)
	}
	cancelExecution(t, h, "exc-queued", true)
	rec := h.record(t, "exc-queued")
	if rec.Status != StatusCancelled || rec.Error != "cancelled by request" || rec.Queued || rec.ExitCode != nil {
		t.Errorf("record: %+v", rec)
	}
	if n := len(h.sb.processes()); n != 1 {
		t.Errorf("%d processes started, want only the running one", n)
	}
	if _, queued := h.svc.slots.counts(); queued != 0 {
		t.Errorf("%d still queued", queued)
	}
	// Cancelling again says it is over.
	if msg := cancelExecution(t, h, "exc-queued", false); !strings.Contains(msg, "already finished") {
		t.Errorf("second cancel: %q", msg)
	}
	cancelExecution(t, h, "exc-running", true)
}

// A refusal answers "at capacity" (Flux retries or answers 503 on those
// words). Flux ignores the error of an async response, so an async refusal
// leaves a failed record; a sync one leaves none.
func TestRefusalRecords(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "one", MaxConcurrency: 1, MaxConcurrencyBehavior: BehaviorExit},
		runsUntilCancelled(""))
	h.execute(t, "one", "exc-running", true)

	resp, err := h.execute(t, "one", "exc-sync-refused", false)
	if err != nil || !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("sync refusal: %v %v", resp, err)
	}
	if rec := h.record(t, "exc-sync-refused"); rec != nil {
		t.Errorf("a sync refusal left a record: %+v", rec)
	}
	resp, err = h.execute(t, "one", "exc-async-refused", true)
	if err != nil || !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("async refusal: %v %v", resp, err)
	}
	rec := h.record(t, "exc-async-refused")
	if rec == nil || rec.Status != StatusFailed || !strings.Contains(rec.Error, "at capacity") || rec.StatusAt == nil {
		t.Errorf("async refusal record: %+v", rec)
	}
	resp, err = h.execute(t, "nobody", "exc-unknown", true)
	if err != nil || !strings.Contains(resp.GetError(), "not registered") {
		t.Errorf("unknown function: %v %v", resp, err)
	}
	if rec := h.record(t, "exc-unknown"); rec == nil || rec.Status != StatusFailed {
		t.Errorf("unknown function record: %+v", rec)
	}
	if n := len(h.sb.processes()); n != 1 {
		t.Errorf("%d processes started, want 1", n)
	}
	cancelExecution(t, h, "exc-running", true)
}

// An execution id is used once: a second call with a running id, or the id
// of a finished execution, is refused, and the duplicate never runs a
// single instruction of the function. With a sandbox that cannot hold a
// process (today's), the duplicate may run, but none of its output reaches
// the other execution's record.
func TestDuplicateIDs(t *testing.T) {
	for _, atOnce := range []bool{false, true} {
		t.Run(fmt.Sprintf("runsAtOnce=%v", atOnce), func(t *testing.T) {
			h := newHarness(t, nil)
			h.register(t, &fluxpb.FunctionConfig{Name: "f"}, runsUntilCancelled("first run\n"))
			h.execute(t, "f", "exc-running", true)
			h.waitRecord(t, "exc-running", "output", func(r *Record) bool { return r.Output == "first run\n" })
			for _, async := range []bool{false, true} {
				_, err := h.execute(t, "f", "exc-running", async)
				if status.Code(err) != codes.AlreadyExists {
					t.Errorf("running id again (async=%v): %v, want AlreadyExists", async, err)
				}
			}
			cancelExecution(t, h, "exc-running", true)
			finished := h.record(t, "exc-running")

			h.sb.runsAtOnce = atOnce
			h.register(t, &fluxpb.FunctionConfig{Name: "f"}, exits(0, "DUPLICATE OUTPUT\n"))
			for _, async := range []bool{false, true} {
				_, err := h.execute(t, "f", "exc-running", async)
				if status.Code(err) != codes.AlreadyExists {
					t.Errorf("finished id again (async=%v): %v, want AlreadyExists", async, err)
				}
				if !waitFor(5*time.Second, func() bool { return h.svc.ActiveTasks() == 0 }) {
					t.Fatal("the duplicate did not end")
				}
			}
			// The sync duplicate's process started while the id was
			// claimed; the async one starts only after a claim.
			procs := h.sb.processes()
			if len(procs) != 2 {
				t.Fatalf("%d processes, want the first and the sync duplicate's", len(procs))
			}
			for _, p := range procs[1:] {
				if !atOnce && (p.ran.Load() || p.wasResumed()) {
					t.Error("a duplicate's process ran")
				}
			}
			if diff := cmp.Diff(finished, h.record(t, "exc-running")); diff != "" {
				t.Errorf("the finished record changed (-before +after):\n%s", diff)
			}
		})
	}
}

// A cancel that comes while the process is being started kills it before
// the function's first instruction.
func TestCancelRacingTheStart(t *testing.T) {
	h := newHarness(t, nil)
	h.sb.gate = make(chan struct{})
	h.sb.starting = make(chan sandbox.Spec, 1)
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, runsUntilCancelled("ran\n"))
	done := make(chan *fluxpb.ExecutionResponse, 1)
	go func() {
		resp, _ := h.svc.ExecuteFunction(context.Background(), &fluxpb.ExecutionRequest{FunctionName: "f", ExecutionId: "exc-1"})
		done <- resp
	}()
	<-h.sb.starting
	cancelled := make(chan string, 1)
	go func() {
		resp, _ := h.svc.CancelExecution(context.Background(), &fluxpb.CancelExecutionRequest{ExecutionId: "exc-1"})
		cancelled <- resp.GetMessage()
	}()
	if !waitFor(5*time.Second, func() bool {
		_, c := h.svc.activeExecutions()[0].cancelReason()
		return c
	}) {
		t.Fatal("the cancel did not arrive")
	}
	close(h.sb.gate) // the start completes after the cancel
	resp := <-done
	if resp.GetError() != "cancelled by request" || len(resp.GetOutput()) != 0 {
		t.Errorf("response: %v", resp)
	}
	if msg := <-cancelled; msg != "execution exc-1 cancelled" {
		t.Errorf("cancel: %q", msg)
	}
	if p := h.sb.processes()[0]; p.ran.Load() {
		t.Error("the function ran after its cancel")
	}
	if rec := h.record(t, "exc-1"); rec.Status != StatusCancelled || rec.Output != "" {
		t.Errorf("record: %+v", rec)
	}
}

// A sync caller that goes away takes its execution with it.
func TestSyncCallerGivesUp(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "slow"}, runsUntilCancelled("started\n"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := h.svc.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "slow", ExecutionId: "exc-1"})
		done <- err
	}()
	h.waitRecord(t, "exc-1", "started", func(r *Record) bool { return r.Output == "started\n" })
	cancel()
	<-done
	rec := h.waitRecord(t, "exc-1", "final", isFinal)
	if rec.Status != StatusCancelled || !strings.Contains(rec.Error, "caller gave up") {
		t.Errorf("record: %+v", rec)
	}
}

// Queued executions start in the order they came, and a re-registration
// that raises the limit starts them at once.
func TestQueueOrderAndRaisedLimit(t *testing.T) {
	h := newHarness(t, nil)
	cfg := func(limit int32) *fluxpb.FunctionConfig {
		return &fluxpb.FunctionConfig{Name: "q", MaxConcurrency: limit, MaxConcurrencyBehavior: BehaviorWait}
	}
	h.register(t, cfg(1), runsUntilCancelled(""))
	ids := []string{"exc-0", "exc-1", "exc-2", "exc-3", "exc-4"}
	for _, id := range ids {
		if _, err := h.execute(t, "q", id, true); err != nil {
			t.Fatal(err)
		}
	}
	startedIDs := func() []string {
		var got []string
		for _, p := range h.sb.processes() {
			got = append(got, p.env("FLUX_EXECUTION_ID"))
		}
		return got
	}
	for i := 1; i <= 3; i++ {
		if !waitFor(5*time.Second, func() bool { return len(startedIDs()) == i }) {
			t.Fatalf("started %v, want %d", startedIDs(), i)
		}
		if diff := cmp.Diff(ids[:i], startedIDs()); diff != "" {
			t.Fatalf("start order (-want +got):\n%s", diff)
		}
		if i < 3 {
			cancelExecution(t, h, ids[i-1], true)
		}
	}
	rec := h.waitRecord(t, "exc-2", "dequeued", func(r *Record) bool { return !r.Queued })
	if rec.Status != StatusRunning || rec.QueuedMS == 0 && rec.StartedAt.IsZero() {
		t.Errorf("dequeued record: %+v", rec)
	}
	if rec := h.record(t, "exc-3"); !rec.Queued {
		t.Errorf("exc-3 should still wait: %+v", rec)
	}
	// Re-registered with a limit of 3: both waiters start at once.
	h.register(t, cfg(3), runsUntilCancelled(""))
	if !waitFor(5*time.Second, func() bool { return len(startedIDs()) == 5 }) {
		t.Fatalf("a raised limit did not start the queue: %v", startedIDs())
	}
	for _, id := range ids[2:] {
		cancelExecution(t, h, id, true)
	}
}

// Functions that set no timeout or memory limit get the node's defaults;
// the record and the error text say which applied.
func TestNodeDefaults(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.DefaultTimeout = 2 * time.Second
		o.DefaultMemoryBytes = 256 << 20
	})
	timesOut := func(_ io.Writer, _ <-chan struct{}) sandbox.Result {
		return sandbox.Result{ExitCode: 143, Signal: 15, TimedOut: true, MemoryLimitBytes: 256 << 20}
	}
	h.register(t, &fluxpb.FunctionConfig{Name: "bare"}, timesOut)
	h.register(t, &fluxpb.FunctionConfig{Name: "own", TimeoutSeconds: 5, MemoryMb: 64}, exits(0, ""))
	resp, _ := h.execute(t, "bare", "exc-bare", false)
	if resp.GetError() != "execution timed out after 2s" {
		t.Errorf("error: %q", resp.GetError())
	}
	h.execute(t, "own", "exc-own", false)
	procs := h.sb.processes()
	if got := procs[0].spec; got.Timeout != 2*time.Second || *got.Limits.MemoryBytes != 256<<20 {
		t.Errorf("defaults not applied: timeout %s memory %v", got.Timeout, got.Limits.MemoryBytes)
	}
	if got := procs[1].spec; got.Timeout != 5*time.Second || *got.Limits.MemoryBytes != 64<<20 {
		t.Errorf("the function's own limits must win: timeout %s memory %d", got.Timeout, *got.Limits.MemoryBytes)
	}
	if rec := h.record(t, "exc-bare"); rec.TimeoutMS != 2000 || rec.MemoryLimitBytes != 256<<20 || !rec.TimedOut {
		t.Errorf("record: %+v", rec)
	}
}

// Shutdown cancels what waits in the queue at once, lets running
// executions finish within the grace, then kills the rest; every record
// is final when it returns.
func TestShutdownQueuedAndRunning(t *testing.T) {
	h := newHarness(t, nil)
	h.register(t, &fluxpb.FunctionConfig{Name: "one", MaxConcurrency: 1, MaxConcurrencyBehavior: BehaviorWait},
		runsUntilCancelled("up\n"))
	h.execute(t, "one", "exc-running", true)
	h.execute(t, "one", "exc-queued", true)
	h.waitRecord(t, "exc-running", "up", func(r *Record) bool { return r.Output == "up\n" })

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := h.svc.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("shutdown took %s with a 200ms grace", d)
	}
	if rec := h.record(t, "exc-queued"); rec.Status != StatusCancelled || !strings.Contains(rec.Error, "before the execution started") {
		t.Errorf("queued: %+v", rec)
	}
	if rec := h.record(t, "exc-running"); rec.Status != StatusCancelled || !strings.Contains(rec.Error, "before the execution finished") || rec.Output != "up\n" {
		t.Errorf("running: %+v", rec)
	}
	if _, err := h.execute(t, "one", "exc-late", false); status.Code(err) != codes.Unavailable {
		t.Errorf("an execution after shutdown: %v, want Unavailable", err)
	}
}

// With Redis stalled, Shutdown still returns within its grace plus
// ShutdownAfterGrace (systemd's stop timeout must not kill the agent
// first), and the next start settles the record it could not write.
func TestShutdownWithRedisStalled(t *testing.T) {
	h := newHarness(t, nil)
	h.unsettledOK = true
	h.svc.Start(context.Background()) // its upkeep, stalled too, must stop within the budget
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, runsUntilCancelled("up\n"))
	h.execute(t, "f", "exc-1", true)
	h.waitRecord(t, "exc-1", "up", func(r *Record) bool { return r.Output == "up\n" })
	if err := h.redis.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	const grace = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	start := time.Now()
	err := h.svc.Shutdown(ctx)
	took := time.Since(start)
	t.Logf("shutdown with Redis stopped: %s, %v", took, err)
	if took > grace+ShutdownAfterGrace+500*time.Millisecond {
		t.Errorf("shutdown took %s: beyond its grace and %s", took, ShutdownAfterGrace)
	}
	if err := h.redis.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// The final write sent before Redis stopped may land when it resumes;
	// if not, the execution is still in the running set and the next start
	// settles it.
	next, err := newService(h.svc.opts, h.sb, h.code)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := next.Settle(context.Background()); err != nil {
		t.Errorf("settle: %v", err)
	}
	if rec := h.record(t, "exc-1"); !rec.Final() || rec.Output != "up\n" {
		t.Errorf("after settle: %+v", rec)
	}
	if n, err := h.redis.client.SCard(context.Background(), next.state.runningKey()).Result(); err != nil || n != 0 {
		t.Errorf("running set after settle: %d, %v", n, err)
	}
}

// What all running sync executions keep for their replies is bounded
// node-wide; a reply past it is cut with a marker, the record is whole.
func TestSyncReplyBudget(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.SyncOutputBytes = 64 << 10 })
	big := strings.Repeat("y", 256<<10)
	h.register(t, &fluxpb.FunctionConfig{Name: "big"}, exits(0, big))
	resp, err := h.execute(t, "big", "exc-1", false)
	if err != nil || resp.GetError() != "" {
		t.Fatal(resp, err)
	}
	if out := string(resp.GetOutput()); len(out) > 64<<10+200 || !strings.Contains(out, "GetExecution has the whole output") {
		t.Errorf("reply of %d bytes, ends %q", len(out), out[max(0, len(out)-100):])
	}
	if rec := h.record(t, "exc-1"); rec.Output != big || rec.OutputTruncated {
		t.Errorf("record: %d bytes, truncated %v", len(rec.Output), rec.OutputTruncated)
	}
}

// Many callers reading a large record at once wait for the reply budget
// instead of each building a copy; one whose deadline passes while it
// waits gets DeadlineExceeded.
func TestGetExecutionBudget(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.ReplyBytes = 4 << 20 })
	control := strings.Repeat("\x01", 256<<10)
	h.register(t, &fluxpb.FunctionConfig{Name: "ctl"}, exits(0, control))
	h.execute(t, "ctl", "exc-1", false)
	cost := replyCost(256<<10, 2)
	if cost > 4<<20 || 2*cost <= 4<<20 {
		t.Fatalf("the test needs one reply to fit the budget and two not to: cost %d", cost)
	}
	// One caller holds the budget; the next waits past its deadline.
	if _, err := h.svc.replies.acquire(context.Background(), cost); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := h.svc.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: "exc-1"}); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a caller past its deadline: %v", err)
	}
	h.svc.replies.release(cost)

	results := make(chan error, 8)
	for range 8 {
		go func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			resp, err := h.svc.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: "exc-1"})
			if err == nil && !strings.Contains(string(resp.GetData()), `\u0001\u0001`) {
				err = status.Error(codes.Internal, "wrong record")
			}
			results <- err
		}()
	}
	for range 8 {
		if err := <-results; err != nil {
			t.Error(err)
		}
	}
}
