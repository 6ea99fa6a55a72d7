package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

func TestHealthAndNodeStatus(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "max_tasks: 7\n", AgentID: "agent-status"})
	c := a.client(t)
	ctx := context.Background()

	h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
	if err != nil || !h.GetHealthy() || h.GetVersion() != "e2e-test" {
		t.Fatalf("HealthCheck = %v, %v; want healthy, version e2e-test", h, err)
	}
	st, err := c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetAgentId() != "agent-status" || st.GetMaxTasks() != 7 || st.GetActiveTasks() != 0 {
		t.Errorf("status ids/tasks: %v", st)
	}
	if st.GetMemoryTotalMb() == 0 || st.GetMemoryUsedMb() == 0 || st.GetMemoryUsedMb() > st.GetMemoryTotalMb() {
		t.Errorf("memory: %v", st)
	}
	if p := st.GetMemoryPercent(); p <= 0 || p > 100 {
		t.Errorf("memory_percent = %v", p)
	}
	if p := st.GetCpuPercent(); p < 0 || p > 100 {
		t.Errorf("cpu_percent = %v", p)
	}

	// The standard health service and reflection, for grpcurl.
	hc := healthpb.NewHealthClient(a.dial(t, insecureCreds()))
	if r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "flux.AgentService"}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("grpc.health.v1 Check = %v, %v", r, err)
	}
	rc, err := reflectionpb.NewServerReflectionClient(a.dial(t, insecureCreds())).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
	resp, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !strings.Contains(strings.Join(names, ","), "flux.AgentService") {
		t.Errorf("reflection lists %v", names)
	}

	// Redis gone: unhealthy, not an error.
	install(t, c, fn{Name: "known", Script: "true\n"})
	rs.Client.ShutdownNoSave(ctx)
	if !waitUntil(10*time.Second, func() bool {
		h, err := c.HealthCheck(ctx, &fluxpb.HealthCheckRequest{})
		return err == nil && !h.GetHealthy()
	}) {
		t.Errorf("HealthCheck still healthy with Redis down")
	}
	// Executions cannot be recorded: refused as the agent being unavailable,
	// and nothing is left counted as running.
	for _, name := range []string{"known", "unknown"} {
		_, err = c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: name, ExecutionId: newID()})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("ExecuteFunction(%s) with Redis down: %v, want Unavailable", name, err)
		}
	}
	if st, err := c.ReportNodeStatus(ctx, &fluxpb.NodeStatusRequest{}); err != nil || st.GetActiveTasks() != 0 {
		t.Errorf("node status with Redis down: %v %v", st, err)
	}
}

func TestSyncExecution(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{
		Env:  []string{"AWS_SECRET_ACCESS_KEY=agent-secret", "FLUX_AGENT_SANDBOX_RUN_AS_USER=flux-runner"},
		YAML: "network:\n  node_private_ip: 10.1.2.3\n  node_public_ip: 203.0.113.9\n  public_ip_url: \"\"\n",
	})
	c := a.client(t)
	install(t, c, fn{
		Name: "echo",
		Script: `echo "args:$#:$1:$2"
echo "cwd:$(pwd)"
echo "id:$FLUX_EXECUTION_ID priv:$FLUX_NODE_PRIVATE_IP pub:$FLUX_NODE_PUBLIC_IP"
echo "greeting:$GREETING"
echo "secret:${AWS_SECRET_ACCESS_KEY:-none}"
echo "stdin:$(cat | wc -c)"
cat data.txt
`,
		Files: map[string]string{"data.txt": "from the archive\n"},
		Config: &fluxpb.FunctionConfig{Env: map[string]string{
			"GREETING": "hello world", "FLUX_EXECUTION_ID": "spoofed",
		}},
	})
	resp, id := execSync(t, c, "echo", "one two", "three")
	if resp.GetError() != "" {
		t.Fatalf("error %q; output %s", resp.GetError(), resp.GetOutput())
	}
	out := string(resp.GetOutput())
	for _, want := range []string{
		"args:2:one two:three",
		"id:" + id + " priv:10.1.2.3 pub:203.0.113.9",
		"greeting:hello world",
		"secret:none",
		"stdin:0",
		"from the archive",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "cwd:"+a.AppsDir+"/echo/") {
		t.Errorf("working dir is not the app dir (%s):\n%s", a.AppsDir, out)
	}
	rec := getRecord(t, c, id)
	if rec == nil || rec.Status != "success" || rec.ExitCode == nil || *rec.ExitCode != 0 || rec.Output != out ||
		rec.StatusAt == nil || rec.FunctionName != "echo" || rec.ExecutionID != id {
		t.Errorf("record: %+v", rec)
	}
	if _, err := time.Parse(time.RFC3339, rec.StartedAt); err != nil {
		t.Errorf("started_at %q: %v", rec.StartedAt, err)
	}

	t.Run("exit code", func(t *testing.T) {
		install(t, c, fn{Name: "fails", Script: "echo partial; exit 3\n"})
		resp, id := execSync(t, c, "fails")
		if resp.GetError() != "exit code 3" || string(resp.GetOutput()) != "partial\n" {
			t.Errorf("response: %q %q", resp.GetError(), resp.GetOutput())
		}
		if rec := getRecord(t, c, id); rec.Status != "failed" || *rec.ExitCode != 3 || rec.Error != "exit code 3" {
			t.Errorf("record: %+v", rec)
		}
	})
	t.Run("stdout and stderr interleaved in order", func(t *testing.T) {
		install(t, c, fn{Name: "interleave", Script: `i=0
while [ $i -lt 200 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done
`})
		resp, _ := execSync(t, c, "interleave")
		var want strings.Builder
		for i := 0; i < 200; i++ {
			fmt.Fprintf(&want, "out %d\nerr %d\n", i, i)
		}
		if string(resp.GetOutput()) != want.String() {
			t.Errorf("output out of order or lost chunks:\n%s", resp.GetOutput())
		}
	})
	t.Run("timeout", func(t *testing.T) {
		install(t, c, fn{Name: "slow", Script: "echo begin\nsleep 30 &\nwait\n",
			Config: &fluxpb.FunctionConfig{TimeoutSeconds: 1}})
		start := time.Now()
		resp, id := execSync(t, c, "slow")
		if resp.GetError() != "execution timed out after 1s" || !strings.Contains(string(resp.GetOutput()), "begin") {
			t.Errorf("response: %q %q", resp.GetError(), resp.GetOutput())
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("timeout took %s", d)
		}
		if rec := getRecord(t, c, id); rec.Status != "failed" || !rec.TimedOut {
			t.Errorf("record: %+v", rec)
		}
	})
	t.Run("child holding stdout does not delay the end", func(t *testing.T) {
		install(t, c, fn{Name: "bgchild", Script: "sleep 60 &\necho done\n"})
		start := time.Now()
		resp, _ := execSync(t, c, "bgchild")
		if resp.GetError() != "" || string(resp.GetOutput()) != "done\n" {
			t.Errorf("response: %q %q", resp.GetError(), resp.GetOutput())
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("a background child held the execution for %s", d)
		}
	})
}

func TestAsyncExecution(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "live", Script: "echo first\n" + tr.waitScript() + "echo second\n"})

	id := execAsync(t, c, "live")
	// The record exists as soon as the call returns.
	if rec := getRecord(t, c, id); rec == nil || rec.Status != "running" || rec.StatusAt != nil {
		t.Fatalf("right after the async call: %+v", rec)
	}
	waitRecord(t, c, id, 5*time.Second, "live output", func(r *record) bool {
		return r.Status == "running" && r.Output == "first\n"
	})
	st, _ := c.ReportNodeStatus(context.Background(), &fluxpb.NodeStatusRequest{})
	if st.GetActiveTasks() != 1 {
		t.Errorf("active_tasks = %d while one async execution runs", st.GetActiveTasks())
	}
	tr.fire(t)
	rec := waitRecord(t, c, id, 10*time.Second, "success", isFinal)
	if rec.Status != "success" || rec.Output != "first\nsecond\n" || rec.StatusAt == nil {
		t.Errorf("final record: %+v", rec)
	}
	if !waitUntil(5*time.Second, func() bool {
		st, _ := c.ReportNodeStatus(context.Background(), &fluxpb.NodeStatusRequest{})
		return st.GetActiveTasks() == 0
	}) {
		t.Errorf("active_tasks not back to 0")
	}
}

func TestCancel(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	ctx := context.Background()
	install(t, c, fn{Name: "sleeper", Script: "echo started\nsleep 60 &\nsleep 60\n"})

	id := execAsync(t, c, "sleeper")
	waitRecord(t, c, id, 5*time.Second, "started", func(r *record) bool { return strings.Contains(r.Output, "started") })
	start := time.Now()
	resp, err := c.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: id})
	if err != nil || !resp.GetSuccess() {
		t.Fatalf("cancel: %v %v", resp, err)
	}
	rec := waitRecord(t, c, id, time.Second, "cancelled", isFinal)
	if rec.Status != "cancelled" {
		t.Errorf("record after cancel: %+v", rec)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("cancel took %s", d)
	}
	for _, tc := range []struct{ name, id, want string }{
		{"again", id, "already finished"},
		{"unknown", "exc-unknown", "not running"},
		{"empty", "", "empty"},
		{"hostile", "../../x{y}", "not running"},
	} {
		resp, err := c.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: tc.id})
		if err != nil || resp.GetSuccess() || !strings.Contains(resp.GetMessage(), tc.want) {
			t.Errorf("cancel %s: %v %v; want success=false mentioning %q", tc.name, resp, err, tc.want)
		}
	}

	t.Run("sync", func(t *testing.T) {
		id := newID()
		done := make(chan *fluxpb.ExecutionResponse, 1)
		go func() {
			resp, _ := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "sleeper", ExecutionId: id})
			done <- resp
		}()
		waitRecord(t, c, id, 5*time.Second, "started", func(r *record) bool { return strings.Contains(r.Output, "started") })
		if resp, err := c.CancelExecution(ctx, &fluxpb.CancelExecutionRequest{ExecutionId: id}); err != nil || !resp.GetSuccess() {
			t.Fatalf("cancel: %v %v", resp, err)
		}
		select {
		case resp := <-done:
			if resp.GetError() != "cancelled by request" {
				t.Errorf("sync response after cancel: %v", resp)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("sync call did not return after cancel")
		}
	})
}

func TestExecuteBadInput(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	ctx := context.Background()
	tr := newTrigger(t)
	install(t, c, fn{Name: "wait", Script: tr.waitScript()})
	defer tr.fire(t)

	running := execAsync(t, c, "wait")
	finished := newID()
	install(t, c, fn{Name: "ok", Script: "true\n"})
	if resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "ok", ExecutionId: finished}); err != nil || resp.GetError() != "" {
		t.Fatal(resp, err)
	}
	tests := []struct {
		name string
		req  *fluxpb.ExecutionRequest
		code codes.Code // or OK with an error field containing want
		want string
	}{
		{"empty id", &fluxpb.ExecutionRequest{FunctionName: "ok"}, codes.InvalidArgument, "empty"},
		{"id with braces", &fluxpb.ExecutionRequest{FunctionName: "ok", ExecutionId: "exc-{x}"}, codes.InvalidArgument, "execution_id"},
		{"id too long", &fluxpb.ExecutionRequest{FunctionName: "ok", ExecutionId: strings.Repeat("a", 200)}, codes.InvalidArgument, "execution_id"},
		{"running id", &fluxpb.ExecutionRequest{FunctionName: "wait", ExecutionId: running}, codes.AlreadyExists, "running"},
		{"finished id", &fluxpb.ExecutionRequest{FunctionName: "ok", ExecutionId: finished}, codes.AlreadyExists, "already used"},
		{"traversal name", &fluxpb.ExecutionRequest{FunctionName: "../ok", ExecutionId: newID()}, codes.InvalidArgument, "name"},
		{"NUL in args", &fluxpb.ExecutionRequest{FunctionName: "ok", ExecutionId: newID(), Args: []string{"a\x00b"}}, codes.InvalidArgument, "NUL"},
		{"unregistered", &fluxpb.ExecutionRequest{FunctionName: "nope", ExecutionId: newID()}, codes.OK, "not registered"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := c.ExecuteFunction(ctx, tt.req)
			if status.Code(err) != tt.code {
				t.Fatalf("code %v (%v), want %v", status.Code(err), err, tt.code)
			}
			msg := resp.GetError()
			if err != nil {
				msg = status.Convert(err).Message()
			}
			if !strings.Contains(msg, tt.want) {
				t.Errorf("message %q lacks %q", msg, tt.want)
			}
		})
	}
	// The refused duplicates changed nothing.
	if rec := getRecord(t, c, finished); rec.Status != "success" || rec.FunctionName != "ok" {
		t.Errorf("finished record changed: %+v", rec)
	}
	if rec := getRecord(t, c, running); rec.Status != "running" {
		t.Errorf("running record changed: %+v", rec)
	}
	// An async execution of an unregistered function leaves a failed record.
	id := newID()
	c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "nope", ExecutionId: id, Async: true})
	if rec := getRecord(t, c, id); rec == nil || rec.Status != "failed" || !strings.Contains(rec.Error, "not registered") {
		t.Errorf("async unregistered record: %+v", rec)
	}
	for _, id := range []string{"", "exc-missing", "../../etc/passwd", "a{b}c", strings.Repeat("x", 10000)} {
		resp, err := c.GetExecution(ctx, &fluxpb.GetExecutionRequest{ExecutionId: id})
		if err != nil || resp.GetFound() {
			t.Errorf("GetExecution(%.20q) = %v, %v; want found=false", id, resp, err)
		}
	}
}

func TestRegisterAndDeployBadInput(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	ctx := context.Background()
	bad := []*fluxpb.FunctionConfig{
		{Name: "", Handler: "h.sh"},
		{Name: "../../tmp/evil", Handler: "h.sh"},
		{Name: "a/b", Handler: "h.sh"},
		{Name: ".hidden", Handler: "h.sh"},
		{Name: strings.Repeat("a", 64), Handler: "h.sh"},
		{Name: "ok", Handler: ""},
		{Name: "ok", Handler: "../h.sh"},
		{Name: "ok", Handler: "/bin/sh"},
		{Name: "ok", Handler: "h.sh", Env: map[string]string{"A=B": "x"}},
		{Name: "ok", Handler: "h.sh", Env: map[string]string{"": "x"}},
		{Name: "ok", Handler: "h.sh", Env: map[string]string{"A\x00": "x"}},
		{Name: "ok", Handler: "h.sh", MemoryMb: -1},
		{Name: "ok", Handler: "h.sh", TimeoutSeconds: -5},
		{Name: "ok", Handler: "h.sh", MaxConcurrencyBehavior: "panic"},
	}
	for _, cfg := range bad {
		ack, err := c.RegisterFunction(ctx, cfg)
		if err != nil || ack.GetSuccess() || ack.GetMessage() == "" {
			t.Errorf("RegisterFunction(%v) = %v, %v; want a refusal with a message", cfg, ack, err)
		}
	}
	if entries, _ := os.ReadDir(a.AppsDir); len(entries) != 0 {
		t.Errorf("refused registrations wrote to the apps dir: %v", entries)
	}
	ack, err := c.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: "never-registered", CodeArchive: zipOf(t, map[string]string{"h.sh": "#!/bin/sh\n"})})
	if err != nil || ack.GetSuccess() || !strings.Contains(ack.GetMessage(), "not registered") {
		t.Errorf("deploy of an unregistered function: %v %v", ack, err)
	}
	install(t, c, fn{Name: "good", Script: "echo v1\n"})
	ack, err = c.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: "good", CodeArchive: []byte("not a zip")})
	if err != nil || ack.GetSuccess() {
		t.Errorf("deploy of garbage: %v %v", ack, err)
	}
	if resp, _ := execSync(t, c, "good"); string(resp.GetOutput()) != "v1\n" {
		t.Errorf("a refused deploy disturbed the current version: %q", resp.GetOutput())
	}
}

func TestFunctionsSurviveRestart(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{AgentID: "agent-restart"})
	c := a.client(t)
	install(t, c, fn{Name: "persist", Script: "echo still here\n", Config: &fluxpb.FunctionConfig{Env: map[string]string{"K": "v"}}})
	a.restart(nil)
	c = a.client(t)
	resp, _ := execSync(t, c, "persist")
	if resp.GetError() != "" || string(resp.GetOutput()) != "still here\n" {
		t.Errorf("after restart: %q %q", resp.GetError(), resp.GetOutput())
	}
}

func TestTwoAgentsShareRedis(t *testing.T) {
	rs := startRedis(t)
	a1 := startAgent(t, rs, agentOptions{AgentID: "agent-one"})
	a2 := startAgent(t, rs, agentOptions{AgentID: "agent-two"})
	c1, c2 := a1.client(t), a2.client(t)
	install(t, c1, fn{Name: "shared", Script: "echo one\n"})
	install(t, c2, fn{Name: "shared", Script: "echo two\n"})
	r1, id := execSync(t, c1, "shared")
	r2, _ := execSync(t, c2, "shared")
	if string(r1.GetOutput()) != "one\n" || string(r2.GetOutput()) != "two\n" {
		t.Errorf("outputs %q %q", r1.GetOutput(), r2.GetOutput())
	}
	if getRecord(t, c2, id) != nil {
		t.Errorf("agent two sees agent one's execution")
	}
	keys, _ := rs.Client.Keys(context.Background(), "*").Result()
	for _, k := range keys {
		if !strings.HasPrefix(k, "flux:agent:") || !strings.Contains(k, "{") {
			t.Errorf("key %q is not namespaced with a hash tag", k)
		}
	}
	if ttl := rs.Client.TTL(context.Background(), "flux:agent:agent-one:exec:{"+id+"}").Val(); ttl < 23*time.Hour || ttl > 24*time.Hour {
		t.Errorf("record TTL = %s, want 24h", ttl)
	}
}

func TestOutputLimit(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "output_limit: 64KiB\n"})
	c := a.client(t)
	// 1 MiB of output, then a line that proves the function ran to the end.
	install(t, c, fn{Name: "chatty", Script: "head -c 1048576 /dev/zero | tr '\\0' x\necho; echo finished >&2\ntouch \"$TMPDIR/x\" && echo tmp-ok >&2\n"})
	resp, id := execSync(t, c, "chatty")
	out := string(resp.GetOutput())
	if resp.GetError() != "" || len(out) > 64<<10+200 || !strings.Contains(out, "output truncated") {
		t.Errorf("sync: error %q, %d bytes, marker %v", resp.GetError(), len(out), strings.Contains(out, "output truncated"))
	}
	rec := getRecord(t, c, id)
	if rec.Status != "success" || !rec.OutputTruncated || rec.OutputBytes < 1<<20 || rec.Output != out {
		t.Errorf("record: status %s truncated %v bytes %d same-output %v", rec.Status, rec.OutputTruncated, rec.OutputBytes, rec.Output == out)
	}
}

func TestShutdownWritesFinalStatus(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "shutdown_grace: 3s\n"})
	c := a.client(t)
	tr := newTrigger(t)
	install(t, c, fn{Name: "forever", Script: "echo up\nsleep 600\n"})
	install(t, c, fn{Name: "quick", Script: "echo waiting\n" + tr.waitScript() + "echo quick done\n"})
	long := execAsync(t, c, "forever")
	short := execAsync(t, c, "quick")
	waitRecord(t, c, long, 5*time.Second, "up", func(r *record) bool { return r.Output == "up\n" })
	waitRecord(t, c, short, 5*time.Second, "waiting", func(r *record) bool { return r.Output == "waiting\n" })
	start := time.Now()
	a.cmd.Process.Signal(syscall.SIGTERM)
	// During the grace Flux still reads live output and health, and new
	// executions are refused.
	if !waitUntil(2*time.Second, func() bool {
		h, err := c.HealthCheck(context.Background(), &fluxpb.HealthCheckRequest{})
		return err == nil && !h.GetHealthy()
	}) {
		t.Errorf("HealthCheck during the grace is not answered unhealthy")
	}
	if rec := getRecord(t, c, short); rec.Status != "running" {
		t.Errorf("GetExecution during the grace: %+v", rec)
	}
	if _, err := c.ExecuteFunction(context.Background(), &fluxpb.ExecutionRequest{FunctionName: "quick", ExecutionId: newID()}); status.Code(err) != codes.Unavailable {
		t.Errorf("a new execution during the grace: %v, want Unavailable", err)
	}
	tr.fire(t)
	<-a.exited
	if a.exitErr != nil {
		t.Errorf("agent exit: %v", a.exitErr)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("shutdown took %s with a 3s grace", d)
	}
	a.start(nil)
	c = a.client(t)
	if rec := getRecord(t, c, short); rec.Status != "success" || rec.Output != "waiting\nquick done\n" {
		t.Errorf("the short execution did not finish within the grace: %+v", rec)
	}
	if rec := getRecord(t, c, long); rec.Status != "cancelled" || !strings.Contains(rec.Error, "shut down") {
		t.Errorf("the long execution has no final status: %+v", rec)
	}
}

func TestRedeployWhileRunning(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	tr := newTrigger(t)
	script := func(v string) string {
		return "echo start $(cat version.txt)\n" + tr.waitScript() + "echo end $(cat version.txt) $(ls)\n"
	}
	install(t, c, fn{Name: "app", Script: script("v1"), Files: map[string]string{"version.txt": "v1", "only-v1.txt": ""}})
	old := execAsync(t, c, "app")
	waitRecord(t, c, old, 5*time.Second, "start", func(r *record) bool { return strings.Contains(r.Output, "start v1") })
	ack, err := c.DeployFunction(context.Background(), &fluxpb.DeploymentPackage{FunctionName: "app",
		CodeArchive: zipOf(t, map[string]string{"handler.sh": "#!/bin/sh\n" + script("v2"), "version.txt": "v2"})})
	if err != nil || !ack.GetSuccess() {
		t.Fatal(ack, err)
	}
	next := execAsync(t, c, "app")
	waitRecord(t, c, next, 5*time.Second, "start", func(r *record) bool { return strings.Contains(r.Output, "start v2") })
	tr.fire(t)
	if rec := waitRecord(t, c, old, 10*time.Second, "final", isFinal); !strings.Contains(rec.Output, "end v1 handler.sh only-v1.txt version.txt") {
		t.Errorf("old execution lost its files: %q", rec.Output)
	}
	if rec := waitRecord(t, c, next, 10*time.Second, "final", isFinal); !strings.Contains(rec.Output, "end v2 handler.sh version.txt") {
		t.Errorf("new execution: %q", rec.Output)
	}
	if entries, err := os.ReadDir(filepath.Join(a.AppsDir, "app")); err != nil || len(entries) == 0 {
		t.Errorf("apps dir: %v %v", entries, err)
	}
}

// An agent killed outright (SIGKILL, a crash) leaves records saying
// running; the next start settles them as failed instead of leaving Flux
// waiting until they expire.
func TestCrashedAgentsExecutionsAreSettled(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{AgentID: "agent-crash"})
	c := a.client(t)
	install(t, c, fn{Name: "long", Script: "echo up\nsleep 600\n"})
	id := execAsync(t, c, "long")
	waitRecord(t, c, id, 5*time.Second, "up", func(r *record) bool { return r.Output == "up\n" })
	a.cmd.Process.Kill()
	<-a.exited
	a.start(nil)
	c = a.client(t)
	rec := getRecord(t, c, id)
	if rec == nil || rec.Status != "failed" || !strings.Contains(rec.Error, "agent stopped") || rec.Output != "up\n" {
		t.Errorf("record after the crash: %+v", rec)
	}
}

// A sync caller whose deadline passes (Flux's HTTP request timing out)
// takes its execution with it, and the slot comes back.
func TestSyncCallerGivesUp(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)
	install(t, c, fn{Name: "slow", Script: "echo started\nsleep 600\n",
		Config: &fluxpb.FunctionConfig{MaxConcurrency: 1}})
	id := newID()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	_, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "slow", ExecutionId: id})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("ExecuteFunction: %v, want the caller's deadline", err)
	}
	rec := waitRecord(t, c, id, 5*time.Second, "final", isFinal)
	if rec.Status != "cancelled" || !strings.Contains(rec.Error, "caller gave up") {
		t.Errorf("record: %+v", rec)
	}
	if !waitUntil(5*time.Second, func() bool { return activeTasks(t, c) == 0 }) {
		t.Errorf("the slot was not freed")
	}
}

// log.file sends the log to a file instead of stderr (what a Windows
// service needs), relative to the config file's folder.
func TestLogFile(t *testing.T) {
	rs := startRedis(t)
	dir := t.TempDir()
	// The runner must reach the apps dir, or the agent refuses to start.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	port := freePort(t)
	cfg := fmt.Sprintf("listen_address: 127.0.0.1\nport: %d\nredis_addr: %s\napps_dir: %s/apps\nlog:\n  file: agent.log\ntelemetry:\n  metrics_address: \"\"\nnetwork:\n  public_ip_url: \"\"\nadmin:\n  socket: \"\"\n",
		port, rs.Addr, dir)
	if err := os.WriteFile(filepath.Join(dir, "agent.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(agentBinary)
	cmd.Env = []string{"AGENT_CONFIG=" + filepath.Join(dir, "agent.yaml"), "PATH=" + os.Getenv("PATH")}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	logPath := filepath.Join(dir, "agent.log")
	if !waitUntil(30*time.Second, func() bool {
		data, _ := os.ReadFile(logPath)
		return strings.Contains(string(data), `"msg":"flux-agent started"`)
	}) {
		cmd.Process.Kill()
		<-exited
		t.Fatalf("no start line in %s; stderr:\n%s", logPath, stderr.String())
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-exited; err != nil {
		t.Errorf("agent exit: %v", err)
	}
	if stderr.Len() != 0 {
		t.Errorf("the agent still wrote to stderr:\n%s", stderr.String())
	}
	if fi, err := os.Stat(logPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("log file mode: %v %v", fi, err)
	}
}
