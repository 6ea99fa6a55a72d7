//go:build !windows

// The lifecycle tests run a real redis-server and stop it with SIGSTOP:
// they are built where both exist.

package service

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// logRecorder keeps the messages logged, to count them.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }

func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = append(l.msgs, r.Message)
	return nil
}

func (l *logRecorder) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

// redisErrors counts the Redis errors the service reports, by operation.
type redisErrors struct {
	noMetrics
	mu  sync.Mutex
	ops map[string]int
}

func (m *redisErrors) RedisError(_ context.Context, op string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ops == nil {
		m.ops = map[string]int{}
	}
	m.ops[op]++
}

func (m *redisErrors) count(op string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops[op]
}

var _ Metrics = (*redisErrors)(nil)

// waitsFor prints before, waits for release, prints after and exits 0.
func waitsFor(release <-chan struct{}, before, after string) script {
	return func(out io.Writer, cancel <-chan struct{}) sandbox.Result {
		io.WriteString(out, before)
		select {
		case <-release:
		case <-cancel:
			return sandbox.Result{ExitCode: 137, Signal: 9, Cancelled: true}
		}
		io.WriteString(out, after)
		return sandbox.Result{ExitCode: 0, WallTime: time.Millisecond}
	}
}

// stored reads a record and its output straight from Redis, as another
// agent or a restarted one would; nil when there is none.
func (h *harness) stored(t testing.TB, id string) (*Record, string) {
	t.Helper()
	ctx := context.Background()
	data, err := h.redis.client.Get(ctx, h.svc.state.recordKey(id)).Bytes()
	if err != nil {
		return nil, ""
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatalf("record %s: %v", id, err)
	}
	out, _ := h.redis.client.Get(ctx, h.svc.state.outputKey(id)).Result()
	return &rec, out
}

func (h *harness) runningSet(t testing.TB) []string {
	t.Helper()
	ids, err := h.redis.client.SMembers(context.Background(), h.svc.state.runningKey()).Result()
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// Executions that end while Redis is stalled: the sync caller gets its
// reply within finalWriteTimeout, GetExecution answers the final records
// from the agent meanwhile, and once Redis resumes the records become
// final in Redis without a restart. The outage is logged once, and once
// its end.
func TestFinalRecordsWaitForRedis(t *testing.T) {
	t.Parallel()
	logs, metrics := &logRecorder{}, &redisErrors{}
	h := newHarness(t, func(o *Options) { o.Logger, o.Metrics = slog.New(logs), metrics })
	h.svc.Start(context.Background())
	release := make(chan struct{})
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, waitsFor(release, "before\n", "after\n"))
	ids := []string{"exc-a1", "exc-a2", "exc-s"}
	for _, id := range ids[:2] {
		if _, err := h.execute(t, "f", id, true); err != nil {
			t.Fatal(err)
		}
	}
	type reply struct {
		resp *fluxpb.ExecutionResponse
		err  error
		at   time.Time
	}
	replies := make(chan reply, 1)
	go func() {
		resp, err := h.svc.ExecuteFunction(context.Background(), &fluxpb.ExecutionRequest{FunctionName: "f", ExecutionId: "exc-s"})
		replies <- reply{resp, err, time.Now()}
	}()
	for _, id := range ids {
		h.waitRecord(t, id, "live output", func(r *Record) bool { return r.Output == "before\n" })
	}
	h.redis.stop(t)
	ended := time.Now()
	close(release)
	r := <-replies
	if r.err != nil || r.resp.GetError() != "" || string(r.resp.GetOutput()) != "before\nafter\n" {
		t.Fatalf("sync reply: %v %v", r.resp, r.err)
	}
	took := r.at.Sub(ended)
	t.Logf("sync reply %s after the end, with Redis stalled", took.Round(time.Millisecond))
	if took > finalWriteTimeout+time.Second {
		t.Errorf("the sync reply waited %s for Redis, want at most %s", took, finalWriteTimeout)
	}
	if !waitFor(5*time.Second, func() bool { return h.svc.finals.count() == len(ids) }) {
		t.Fatalf("%d final records pending, want %d", h.svc.finals.count(), len(ids))
	}
	for _, id := range ids {
		if rec := h.record(t, id); rec.Status != StatusSuccess || rec.Output != "before\nafter\n" {
			t.Errorf("%s from the agent while Redis is stalled: %+v", id, rec)
		}
	}
	if n := h.svc.ActiveTasks(); n != len(ids) {
		t.Errorf("active tasks %d, want %d: the pending records count", n, len(ids))
	}
	// Redis stays stalled across several rounds of retries.
	errs0 := metrics.count("finish_record")
	if !waitFor(15*time.Second, func() bool { return metrics.count("finish_record") >= errs0+2 }) {
		t.Fatalf("the final records were not retried: %d failures", metrics.count("finish_record")-errs0)
	}
	h.redis.resume(t)
	for _, id := range ids {
		var rec *Record
		var out string
		if !waitFor(10*time.Second, func() bool {
			rec, out = h.stored(t, id)
			return rec != nil && rec.Final()
		}) {
			t.Fatalf("%s never final in Redis: %+v", id, rec)
		}
		if rec.Status != StatusSuccess || out != "before\nafter\n" {
			t.Errorf("%s in Redis: %+v output %q", id, rec, out)
		}
	}
	if !waitFor(5*time.Second, func() bool { return h.svc.finals.count() == 0 && len(h.runningSet(t)) == 0 }) {
		t.Errorf("after Redis resumed: %d pending, running set %v", h.svc.finals.count(), h.runningSet(t))
	}
	if n := logs.count("final records not written: Redis fails; retrying in the background"); n != 1 {
		t.Errorf("the outage was logged %d times, want once", n)
	}
	if n := logs.count("final records written again"); n != 1 {
		t.Errorf("the end of the outage was logged %d times, want once", n)
	}
}

// The records an earlier run left running are settled as soon as Redis
// answers, however long after the start; those of running executions are
// not.
func TestSettleWaitsForRedis(t *testing.T) {
	t.Parallel()
	metrics := &redisErrors{}
	h := newHarness(t, func(o *Options) { o.Metrics = metrics })
	earlier := Record{ExecutionID: "exc-old", AgentID: "agent-test", FunctionName: "f", Status: StatusRunning,
		StartedAt: time.Now().Add(-time.Hour).UTC()}
	data, _ := json.Marshal(&earlier)
	if _, err := h.svc.state.createRecord(context.Background(), "exc-old", data, false); err != nil {
		t.Fatal(err)
	}
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, runsUntilCancelled("up\n"))
	h.execute(t, "f", "exc-now", true)
	h.waitRecord(t, "exc-now", "running", func(r *Record) bool { return r.Output == "up\n" })

	h.redis.stop(t)
	h.svc.Start(context.Background())
	if !waitFor(10*time.Second, func() bool { return metrics.count("probe") >= 2 }) {
		t.Fatal("the upkeep did not try Redis")
	}
	h.redis.resume(t)
	var rec *Record
	if !waitFor(10*time.Second, func() bool {
		rec, _ = h.stored(t, "exc-old")
		return rec != nil && rec.Final()
	}) {
		t.Fatalf("the earlier run's record was not settled: %+v", rec)
	}
	if rec.Status != StatusFailed || !strings.Contains(rec.Error, "agent stopped") {
		t.Errorf("settled record: %+v", rec)
	}
	if rec := h.record(t, "exc-now"); rec.Status != StatusRunning {
		t.Errorf("a running execution was settled: %+v", rec)
	}
	if ids := h.runningSet(t); len(ids) != 1 || ids[0] != "exc-now" {
		t.Errorf("running set %v, want only exc-now", ids)
	}
	cancelExecution(t, h, "exc-now", true)
}

// An execution that runs longer than the records' TTL keeps its record
// and output: the upkeep refreshes their TTL while it runs.
func TestRunningRecordsOutliveTheirTTL(t *testing.T) {
	t.Parallel()
	const ttl = 3 * time.Second
	h := newHarness(t, func(o *Options) { o.ExecutionTTL = ttl })
	h.svc.Start(context.Background())
	h.register(t, &fluxpb.FunctionConfig{Name: "long"}, runsUntilCancelled("up\n"))
	h.execute(t, "long", "exc-1", true)
	h.waitRecord(t, "exc-1", "output", func(r *Record) bool { return r.Output == "up\n" })
	for end := time.Now().Add(5 * ttl / 2); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if rec, out := h.stored(t, "exc-1"); rec == nil || rec.Status != StatusRunning || out != "up\n" {
			t.Fatalf("after %s of a %s TTL: record %+v, output %q", time.Until(end)+5*ttl/2, ttl, rec, out)
		}
	}
	cancelExecution(t, h, "exc-1", true)
	if rec, out := h.stored(t, "exc-1"); rec.Status != StatusCancelled || out != "up\n" {
		t.Errorf("final: %+v, output %q", rec, out)
	}
}

// Redis restarts empty while executions run: the agent writes back its
// function configs and running records (a silent execution's too), and
// once each execution ends its record holds the whole output from byte 0,
// with no NUL padding. After an agent restart over the same apps dir, with
// Redis empty again, the functions still run without being registered
// again.
func TestRedisRestartsEmpty(t *testing.T) {
	t.Parallel()
	apps := t.TempDir()
	h := newHarness(t, func(o *Options) { o.AppsDir = apps })
	h.svc.Start(context.Background())
	release, quiet := make(chan struct{}), make(chan struct{})
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, waitsFor(release, "before\n", "after\n"))
	h.register(t, &fluxpb.FunctionConfig{Name: "quiet"}, waitsFor(quiet, "", ""))
	if fi, err := os.Stat(filepath.Join(apps, "f", functionFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("local copy of f: %v, %v (want mode 0600: env holds secrets)", fi, err)
	}
	h.execute(t, "f", "exc-async", true)
	h.execute(t, "quiet", "exc-quiet", true)
	replies := make(chan *fluxpb.ExecutionResponse, 1)
	go func() {
		resp, _ := h.svc.ExecuteFunction(context.Background(), &fluxpb.ExecutionRequest{FunctionName: "f", ExecutionId: "exc-sync"})
		replies <- resp
	}()
	for _, id := range []string{"exc-async", "exc-sync"} {
		h.waitRecord(t, id, "live output", func(r *Record) bool { return r.Output == "before\n" })
	}

	h.redis.restartEmpty(t)
	ctx := context.Background()
	if !waitFor(10*time.Second, func() bool {
		n, _ := h.redis.client.HLen(ctx, h.svc.state.functionsKey()).Result()
		if n != 2 || len(h.runningSet(t)) != 3 {
			return false
		}
		for _, id := range []string{"exc-async", "exc-sync", "exc-quiet"} {
			if rec, _ := h.stored(t, id); rec == nil || rec.Status != StatusRunning {
				return false
			}
		}
		_, out := h.stored(t, "exc-async")
		return out == "before\n"
	}) {
		rec, out := h.stored(t, "exc-async")
		t.Fatalf("not written back: running set %v, exc-async %+v output %q", h.runningSet(t), rec, out)
	}
	close(release)
	close(quiet)
	if resp := <-replies; string(resp.GetOutput()) != "before\nafter\n" {
		t.Errorf("sync reply: %v", resp)
	}
	for _, id := range []string{"exc-async", "exc-sync"} {
		rec, out := h.stored(t, id)
		if !waitFor(5*time.Second, func() bool { rec, out = h.stored(t, id); return rec != nil && rec.Final() }) ||
			rec.Status != StatusSuccess || out != "before\nafter\n" {
			t.Errorf("%s after Redis restarted empty: %+v output %q", id, rec, out)
		}
	}
	var quietRec *Record
	if !waitFor(5*time.Second, func() bool { quietRec, _ = h.stored(t, "exc-quiet"); return quietRec != nil && quietRec.Final() }) ||
		quietRec.Status != StatusSuccess {
		t.Errorf("exc-quiet: %+v", quietRec)
	}
	if err := h.svc.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	// The agent restarts over the same apps dir; Redis restarted empty
	// again meanwhile.
	h.redis.restartEmpty(t)
	next, err := newService(h.svc.opts, h.sb, h.code)
	if err != nil {
		t.Fatal(err)
	}
	h.svc = next // the harness shuts it down
	next.Start(context.Background())
	if !waitFor(10*time.Second, func() bool {
		ok, _ := h.redis.client.HExists(ctx, next.state.functionsKey(), "f").Result()
		return ok
	}) {
		t.Fatal("the function configs were not written back to Redis after the agent restarted")
	}
	h.sb.setScript("f", exits(0, "again\n"))
	if resp, err := h.execute(t, "f", "exc-again", false); err != nil || string(resp.GetOutput()) != "again\n" {
		t.Errorf("after an agent restart with Redis empty: %v %v", resp, err)
	}
}

// A claim that fails for the caller never leaves a record saying running.
// Half-failed (the record is written, the running set refuses: in a
// Cluster they are on different nodes), the record is settled as failed.
// Stalled, the claim fails within a try; whatever Redis does with it when
// it resumes, nothing says running once its settling is done.
func TestFailedClaimsAreSettled(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.svc.Start(context.Background())
	h.register(t, &fluxpb.FunctionConfig{Name: "f"}, exits(0, "ran\n"))
	ctx := context.Background()

	if err := h.redis.client.Set(ctx, h.svc.state.runningKey(), "not a set", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.execute(t, "f", "exc-half", true); status.Code(err) != codes.Unavailable {
		t.Fatalf("half-failed claim: %v, want Unavailable", err)
	}
	if rec, _ := h.stored(t, "exc-half"); rec == nil || rec.Status != StatusRunning {
		t.Fatalf("the half-failed claim should have left its record: %+v", rec)
	}
	h.redis.client.Del(ctx, h.svc.state.runningKey()) // the set's node is back

	h.redis.stop(t)
	start := time.Now()
	if _, err := h.execute(t, "f", "exc-stalled", true); status.Code(err) != codes.Unavailable {
		t.Fatalf("claim on a stalled Redis: %v, want Unavailable", err)
	}
	if took := time.Since(start); took > redisTryTimeout+time.Second {
		t.Errorf("a claim on a stalled Redis took %s", took)
	}
	h.redis.resume(t)

	if !waitFor(claimSettleDelay+10*time.Second, func() bool {
		h.svc.settleMu.Lock()
		defer h.svc.settleMu.Unlock()
		return len(h.svc.toSettle) == 0
	}) {
		t.Fatal("the failed claims were not settled")
	}
	if rec, _ := h.stored(t, "exc-half"); rec == nil || rec.Status != StatusFailed || rec.Error != reasonClaimFailed {
		t.Errorf("half-failed claim: %+v", rec)
	}
	if rec, _ := h.stored(t, "exc-stalled"); rec != nil && !rec.Final() {
		t.Errorf("stalled claim: %+v", rec)
	}
	if ids := h.runningSet(t); len(ids) != 0 {
		t.Errorf("running set %v", ids)
	}
	if n := len(h.sb.processes()); n != 0 {
		t.Errorf("%d processes started for async executions whose claims failed", n)
	}
}

// Past maxPendingFinals the oldest final record is given up, and settled
// as failed once Redis answers; the others are written.
func TestPendingFinalsAreBounded(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.svc.finals.limit = 2
	ctx := context.Background()
	ids := []string{"exc-1", "exc-2", "exc-3"}
	for _, id := range ids {
		data, _ := json.Marshal(&Record{ExecutionID: id, Status: StatusRunning, StartedAt: time.Now().UTC()})
		if _, err := h.svc.state.createRecord(ctx, id, data, false); err != nil {
			t.Fatal(err)
		}
	}
	h.redis.stop(t)
	for _, id := range ids {
		now := time.Now().UTC()
		h.svc.finals.add(ctx, &pendingFinal{rec: Record{ExecutionID: id, Status: StatusSuccess, StartedAt: now, StatusAt: &now}},
			errors.New("redis is stalled"))
	}
	if n := h.svc.finals.count(); n != 2 {
		t.Fatalf("%d pending, want the limit, 2", n)
	}
	h.svc.Start(context.Background())
	h.redis.resume(t)
	want := map[string]string{"exc-1": StatusFailed, "exc-2": StatusSuccess, "exc-3": StatusSuccess}
	for id, st := range want {
		var rec *Record
		if !waitFor(10*time.Second, func() bool { rec, _ = h.stored(t, id); return rec.Final() }) || rec.Status != st {
			t.Errorf("%s: %+v, want %s", id, rec, st)
		}
		if st == StatusFailed && rec.Error != reasonFinalDropped {
			t.Errorf("%s: error %q", id, rec.Error)
		}
	}
	if !waitFor(5*time.Second, func() bool { return len(h.runningSet(t)) == 0 }) {
		t.Errorf("running set %v", h.runningSet(t))
	}
}
