package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

func activeTasks(t *testing.T, c fluxpb.AgentServiceClient) int32 {
	t.Helper()
	st, err := c.ReportNodeStatus(context.Background(), &fluxpb.NodeStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st.GetActiveTasks()
}

func TestConcurrencyExit(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "single", Script: "echo in\n" + tr.waitScript(),
		Config: &fluxpb.FunctionConfig{MaxConcurrency: 1, MaxConcurrencyBehavior: "exit"}})

	first := execAsync(t, c, "single")
	waitRecord(t, c, first, 5*time.Second, "running", func(r *record) bool { return r.Output == "in\n" })

	// Sync: refused with "at capacity" (Flux answers 503), no record left,
	// so Flux's retry with the same id is not refused as a duplicate.
	resp, id := execSync(t, c, "single")
	if !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("sync at capacity: error %q", resp.GetError())
	}
	if getRecord(t, c, id) != nil {
		t.Errorf("a refused sync call left a record")
	}
	// Async: Flux ignores the error, so the record must say it.
	second := execAsync(t, c, "single")
	if rec := getRecord(t, c, second); rec == nil || rec.Status != "failed" || !strings.Contains(rec.Error, "at capacity") {
		t.Errorf("async at capacity record: %+v", rec)
	}
	if n := activeTasks(t, c); n != 1 {
		t.Errorf("active_tasks = %d, want 1", n)
	}
	tr.fire(t)
	waitRecord(t, c, first, 10*time.Second, "final", isFinal)
	// The slot is free again.
	if resp, _ := execSync(t, c, "single"); resp.GetError() != "" {
		t.Errorf("after the first finished: %q", resp.GetError())
	}
}

func TestConcurrencyWaitQueuesFIFO(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	tr := newTrigger(t)
	order := filepath.Join(filepath.Dir(string(tr)), "order")
	os.WriteFile(order, nil, 0o666)
	os.Chmod(order, 0o666)
	install(t, c, fn{Name: "serial", Script: "echo \"$FLUX_EXECUTION_ID\" >> " + order + "\n" + tr.waitScript(),
		Config: &fluxpb.FunctionConfig{MaxConcurrency: 1, MaxConcurrencyBehavior: "wait"}})

	first := execAsync(t, c, "serial")
	waitRecord(t, c, first, 5*time.Second, "running", func(r *record) bool { return !r.Queued })
	var queued []string
	for i := 0; i < 3; i++ {
		id := execAsync(t, c, "serial")
		rec := getRecord(t, c, id)
		if rec == nil || rec.Status != "running" || !rec.Queued {
			t.Fatalf("execution %d should be queued: %+v", i, rec)
		}
		queued = append(queued, id)
	}
	if n := activeTasks(t, c); n != 4 {
		t.Errorf("active_tasks = %d, want 4 (queued executions count: the node is not idle)", n)
	}
	// A queued execution can be cancelled and never runs.
	cancelled := queued[1]
	if resp, err := c.CancelExecution(context.Background(), &fluxpb.CancelExecutionRequest{ExecutionId: cancelled}); err != nil || !resp.GetSuccess() {
		t.Fatalf("cancel queued: %v %v", resp, err)
	}
	if rec := getRecord(t, c, cancelled); rec.Status != "cancelled" || rec.Queued {
		t.Errorf("cancelled queued record: %+v", rec)
	}
	// A sync call with "wait" is refused: Flux itself retries every 500 ms.
	if resp, _ := execSync(t, c, "serial"); !strings.Contains(resp.GetError(), "at capacity") {
		t.Errorf("sync wait at capacity: %q", resp.GetError())
	}

	tr.fire(t)
	for _, id := range []string{first, queued[0], queued[2]} {
		rec := waitRecord(t, c, id, 10*time.Second, "success", isFinal)
		if rec.Status != "success" {
			t.Errorf("%s: %+v", id, rec)
		}
	}
	data, _ := os.ReadFile(order)
	want := strings.Join([]string{first, queued[0], queued[2]}, "\n") + "\n"
	if string(data) != want {
		t.Errorf("run order:\n%s\nwant FIFO:\n%s", data, want)
	}
	if rec := getRecord(t, c, queued[0]); rec.raw["queued_ms"] == nil {
		t.Errorf("a queued execution's record does not say how long it waited: %v", rec.raw)
	}
}

func TestQueueLimit(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "queue_limit: 1\n"})
	c := a.client(t)
	tr := newTrigger(t)
	defer tr.fire(t)
	install(t, c, fn{Name: "serial", Script: tr.waitScript(),
		Config: &fluxpb.FunctionConfig{MaxConcurrency: 1, MaxConcurrencyBehavior: "wait"}})
	execAsync(t, c, "serial")
	execAsync(t, c, "serial") // queued
	over := execAsync(t, c, "serial")
	if rec := getRecord(t, c, over); rec == nil || rec.Status != "failed" || !strings.Contains(rec.Error, "at capacity") {
		t.Errorf("beyond the queue: %+v", rec)
	}
}

func TestMaxTasks(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "max_tasks: 1\n"})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "a", Script: "echo a\n" + tr.waitScript()})
	install(t, c, fn{Name: "b", Script: "echo b\n"})
	id := execAsync(t, c, "a")
	waitRecord(t, c, id, 5*time.Second, "running", func(r *record) bool { return r.Output == "a\n" })
	resp, _ := execSync(t, c, "b")
	if !strings.Contains(resp.GetError(), "at capacity") || !strings.Contains(resp.GetError(), "max_tasks") {
		t.Errorf("node at capacity: %q", resp.GetError())
	}
	tr.fire(t)
	waitRecord(t, c, id, 10*time.Second, "final", isFinal)
	if resp, _ := execSync(t, c, "b"); resp.GetError() != "" || string(resp.GetOutput()) != "b\n" {
		t.Errorf("after the slot freed: %v", resp)
	}
}

// Slots come back on every way an execution can end.
func TestSlotsFreedOnEveryPath(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "max_tasks: 1\n"})
	c := a.client(t)
	install(t, c, fn{Name: "fail", Script: "exit 1\n"})
	install(t, c, fn{Name: "slow", Script: "sleep 30\n", Config: &fluxpb.FunctionConfig{TimeoutSeconds: 1}})
	// Deployed, then re-registered with a handler its code lacks.
	install(t, c, fn{Name: "nohandler", Script: "true\n"})
	if ack, err := c.RegisterFunction(context.Background(), &fluxpb.FunctionConfig{Name: "nohandler", Handler: "missing.sh"}); err != nil || !ack.GetSuccess() {
		t.Fatal(ack, err)
	}
	// Registered, never deployed.
	if ack, err := c.RegisterFunction(context.Background(), &fluxpb.FunctionConfig{Name: "undeployed", Handler: "h.sh"}); err != nil || !ack.GetSuccess() {
		t.Fatal(ack, err)
	}
	for _, name := range []string{"fail", "slow", "nohandler", "undeployed", "fail"} {
		resp, _ := execSync(t, c, name)
		if resp.GetError() == "" || strings.Contains(resp.GetError(), "at capacity") {
			t.Errorf("%s: error %q; want its own failure, not a leaked slot", name, resp.GetError())
		}
	}
	id := execAsync(t, c, "slow")
	waitRecord(t, c, id, 10*time.Second, "final", isFinal)
	if n := activeTasks(t, c); n != 0 {
		t.Errorf("active_tasks = %d after everything ended", n)
	}
}
