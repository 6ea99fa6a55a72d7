package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc/metadata"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// executeMethodSpan is the otelgrpc server span name of ExecuteFunction.
const executeMethodSpan = "flux.AgentService/ExecuteFunction"

// fastExport makes the agent's batch span processor export every 50 ms, so
// tests wait for Jaeger briefly rather than the default 5 s.
var fastExport = []string{"OTEL_BSP_SCHEDULE_DELAY=50"}

// telemetryYAML is the agent's telemetry block for an OTLP endpoint; it keeps
// the metrics server on a free port as the harness's default does.
func telemetryYAML(endpoint string, push bool) string {
	return fmt.Sprintf(`telemetry:
  metrics_address: "127.0.0.1:0"
  otlp_endpoint: %q
  otlp_insecure: true
  metrics_push: %t
`, endpoint, push)
}

func randomHex(t testing.TB, bytes int) string {
	t.Helper()
	b := make([]byte, bytes)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// TestTraceOfAsyncExecutionInJaeger runs an async execution whose request
// carries a W3C traceparent, as a traced Flux would send, and reads the
// trace back from a real Jaeger: one trace, continuing the caller's, holding
// the gRPC server span, the execution span with its attributes, the sandbox
// spans and the Redis spans.
func TestTraceOfAsyncExecutionInJaeger(t *testing.T) {
	j := startJaeger(t)
	rs := startRedis(t)
	const agentID = "e2e-traced-agent"
	a := startAgent(t, rs, agentOptions{AgentID: agentID, YAML: telemetryYAML(j.OTLPGRPCAddr, false), Env: fastExport})
	c := a.client(t)
	install(t, c, fn{Name: "traced", Script: "echo traced-output\n"})

	traceID, callerSpanID := randomHex(t, 16), randomHex(t, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+traceID+"-"+callerSpanID+"-01")
	id := newID()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "traced", ExecutionId: id, Async: true})
	if err != nil || resp.GetError() != "" {
		t.Fatalf("execute async: %v %q", err, resp.GetError())
	}
	rec := waitRecord(t, c, id, 30*time.Second, "final status", isFinal)
	if rec.Status != "success" {
		t.Fatalf("execution ended %s: %+v", rec.Status, rec)
	}

	// Spans reach Jaeger in batches; wait until the execution span (exported
	// when it ends, after the final record) and a Redis span are there.
	var traces []jaegerTrace
	complete := func() bool {
		traces = j.traces(t, traceID)
		if len(traces) == 0 {
			return false
		}
		spans := traces[0].Spans
		return slices.ContainsFunc(spans, func(s jaegerSpan) bool { return s.OperationName == telemetry.SpanExecution }) &&
			slices.ContainsFunc(spans, func(s jaegerSpan) bool { return s.OperationName == executeMethodSpan }) &&
			slices.ContainsFunc(spans, isRedisSpan)
	}
	if !waitUntil(30*time.Second, complete) {
		t.Fatalf("trace %s incomplete in Jaeger after 30s: %s", traceID, describeTraces(traces))
	}
	if len(traces) != 1 {
		t.Fatalf("Jaeger holds %d traces for %s, want 1", len(traces), traceID)
	}
	tr := traces[0]
	t.Logf("trace %s: %s", traceID, describeTraces(traces))

	byName := map[string][]jaegerSpan{}
	children := map[string][]jaegerSpan{}
	for _, s := range tr.Spans {
		byName[s.OperationName] = append(byName[s.OperationName], s)
		children[s.parentOf()] = append(children[s.parentOf()], s)
		if p := tr.Processes[s.ProcessID]; p.ServiceName != telemetry.ServiceName {
			t.Errorf("span %s from service %q, want %q", s.OperationName, p.ServiceName, telemetry.ServiceName)
		} else if got, _ := tagValue(p.Tags, string(telemetry.AttrAgentID)); got != agentID {
			t.Errorf("span %s: resource %s = %q, want %q", s.OperationName, telemetry.AttrAgentID, got, agentID)
		}
	}

	server := byName[executeMethodSpan]
	if len(server) != 1 {
		t.Fatalf("%d %s spans, want 1", len(server), executeMethodSpan)
	}
	if got := server[0].parentOf(); got != callerSpanID {
		t.Errorf("gRPC server span's parent = %q, want the caller's span %s (traceparent not continued)", got, callerSpanID)
	}
	if kind, _ := tagValue(server[0].Tags, "span.kind"); kind != "server" {
		t.Errorf("gRPC span kind = %q, want server", kind)
	}

	execSpans := byName[telemetry.SpanExecution]
	if len(execSpans) != 1 {
		t.Fatalf("%d %s spans, want 1", len(execSpans), telemetry.SpanExecution)
	}
	exec := execSpans[0]
	if got := exec.parentOf(); got != server[0].SpanID {
		t.Errorf("execution span's parent = %q, want the gRPC server span %s", got, server[0].SpanID)
	}
	wantTags := map[string]string{
		string(telemetry.AttrFunction):        "traced",
		string(telemetry.AttrExecutionID):     id,
		string(telemetry.AttrAsync):           "true",
		string(telemetry.AttrStatus):          telemetry.StatusSuccess,
		string(telemetry.AttrExitCode):        "0",
		string(telemetry.AttrOutputBytes):     strconv.Itoa(len("traced-output\n")),
		string(telemetry.AttrOutputTruncated): "false",
		string(telemetry.AttrOOMKilled):       "false",
	}
	for key, want := range wantTags {
		if got, ok := tagValue(exec.Tags, key); !ok || got != want {
			t.Errorf("execution span %s = %q (present %v), want %q", key, got, ok, want)
		}
	}
	for _, key := range []attribute.Key{telemetry.AttrPeakMemoryBytes, telemetry.AttrCPUTimeMS} {
		if _, ok := tagValue(exec.Tags, string(key)); !ok {
			t.Errorf("execution span lacks %s", key)
		}
	}

	for _, name := range []string{telemetry.SpanSandboxStart, telemetry.SpanSandboxWait} {
		if !slices.ContainsFunc(children[exec.SpanID], func(s jaegerSpan) bool { return s.OperationName == name }) {
			t.Errorf("no %s span under the execution span", name)
		}
	}

	underExec := 0
	for _, s := range descendants(children, exec.SpanID) {
		if isRedisSpan(s) {
			underExec++
		}
	}
	if underExec == 0 {
		t.Errorf("no Redis span under the execution span")
	}

	checkExecutionLogLines(t, a, id, "traced", traceID)
}

// checkExecutionLogLines checks that every agent log line about execution id
// names its function and carries the execution's trace and a span id, so a
// line leads to its trace and back.
func checkExecutionLogLines(t *testing.T, a *agent, id, function, traceID string) {
	t.Helper()
	lines := 0
	for _, line := range strings.Split(a.logs.String(), "\n") {
		var fields map[string]any
		if json.Unmarshal([]byte(line), &fields) != nil || fields[telemetry.LogExecutionID] != id {
			continue
		}
		lines++
		if fields[telemetry.LogFunction] != function || fields[telemetry.LogTraceID] != traceID || fields[telemetry.LogSpanID] == nil {
			t.Errorf("log line about %s lacks function %s, trace_id %s or span_id: %s", id, function, traceID, line)
		}
	}
	if lines == 0 {
		t.Errorf("no log line names execution %s", id)
	}
}

// TestTraceOfDeployInJaeger deploys with a traceparent and finds the deploy
// span, with its attributes, under the DeployFunction server span.
func TestTraceOfDeployInJaeger(t *testing.T) {
	j := startJaeger(t)
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: telemetryYAML(j.OTLPGRPCAddr, false), Env: fastExport})
	c := a.client(t)
	install(t, c, fn{Name: "deployed", Script: "echo v1\n"}) // registers; the traced deploy below is the second

	traceID, callerSpanID := randomHex(t, 16), randomHex(t, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+traceID+"-"+callerSpanID+"-01")
	archive := zipOf(t, map[string]string{"handler.sh": "#!/bin/sh\necho v2\n", "data.txt": "two files"})
	ack, err := c.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: "deployed", CodeArchive: archive})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("deploy: %v %v", err, ack)
	}

	var traces []jaegerTrace
	if !waitUntil(30*time.Second, func() bool {
		traces = j.traces(t, traceID)
		return len(traces) > 0 && slices.ContainsFunc(traces[0].Spans, func(s jaegerSpan) bool {
			return s.OperationName == telemetry.SpanDeploy
		})
	}) {
		t.Fatalf("no %s span in trace %s after 30s: %s", telemetry.SpanDeploy, traceID, describeTraces(traces))
	}
	var server, deploy jaegerSpan
	for _, s := range traces[0].Spans {
		switch s.OperationName {
		case "flux.AgentService/DeployFunction":
			server = s
		case telemetry.SpanDeploy:
			deploy = s
		}
	}
	if server.SpanID == "" || server.parentOf() != callerSpanID {
		t.Errorf("DeployFunction server span missing or not under the caller's span: %s", describeTraces(traces))
	}
	if deploy.parentOf() != server.SpanID {
		t.Errorf("%s span's parent = %q, want the DeployFunction span %q", telemetry.SpanDeploy, deploy.parentOf(), server.SpanID)
	}
	wantTags := map[string]string{
		string(telemetry.AttrFunction):    "deployed",
		string(telemetry.AttrDeployBytes): strconv.Itoa(len(archive)),
		string(telemetry.AttrDeployFiles): "2",
	}
	for key, want := range wantTags {
		if got, ok := tagValue(deploy.Tags, key); got != want {
			t.Errorf("deploy span %s = %q (present %v), want %q", key, got, ok, want)
		}
	}
	if v, ok := tagValue(deploy.Tags, string(telemetry.AttrFunctionVersion)); !ok || v == "" {
		t.Errorf("deploy span lacks %s", telemetry.AttrFunctionVersion)
	}
}

// isRedisSpan tells redisotel's spans by their database system attribute.
func isRedisSpan(s jaegerSpan) bool {
	for _, key := range []string{"db.system.name", "db.system"} {
		if v, _ := tagValue(s.Tags, key); v == "redis" {
			return true
		}
	}
	return false
}

func descendants(children map[string][]jaegerSpan, id string) []jaegerSpan {
	var out []jaegerSpan
	for _, c := range children[id] {
		out = append(out, c)
		out = append(out, descendants(children, c.SpanID)...)
	}
	return out
}

// describeTraces lists span names with their parents, for failure messages.
func describeTraces(traces []jaegerTrace) string {
	var b strings.Builder
	for _, tr := range traces {
		fmt.Fprintf(&b, "\ntrace %s, %d spans:", tr.TraceID, len(tr.Spans))
		for _, s := range tr.Spans {
			fmt.Fprintf(&b, "\n  %s %s (parent %s)", s.SpanID, s.OperationName, s.parentOf())
		}
	}
	if b.Len() == 0 {
		return "no trace"
	}
	return b.String()
}

// metricsSample reads the agent's /metrics into samples keyed by
// name{label="value",…} with labels sorted.
func metricsSample(t testing.TB, a *agent) map[string]float64 {
	t.Helper()
	if a.MetricsURL == "" {
		t.Fatal("agent serves no metrics (no metrics_address in its start-up line)")
	}
	code, body := httpGet(t, a.MetricsURL+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics answered %d", code)
	}
	return parseMetrics(t, body)
}

func httpGet(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// parseMetrics reads Prometheus text format samples (no escaped quotes or
// commas inside label values, which the agent's labels never hold).
func parseMetrics(t testing.TB, body string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cut := strings.LastIndexByte(line, ' ')
		series, valueText := line[:cut], line[cut+1:]
		value, err := strconv.ParseFloat(valueText, 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		name, labels, hasLabels := strings.Cut(series, "{")
		if hasLabels {
			parts := strings.Split(strings.TrimSuffix(labels, "}"), ",")
			sort.Strings(parts)
			name += "{" + strings.Join(parts, ",") + "}"
		}
		out[name] = value
	}
	return out
}

// TestMetricsEndpointCountsExecutions scrapes the agent's /metrics around a
// deploy and a few executions and checks the counters moved by exactly that.
func TestMetricsEndpointCountsExecutions(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{})
	c := a.client(t)

	if code, body := httpGet(t, a.MetricsURL+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, body := httpGet(t, a.MetricsURL+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d %q", code, body)
	}

	before := metricsSample(t, a)
	install(t, c, fn{Name: "counted", Script: "echo counted\n"})
	install(t, c, fn{Name: "failing", Script: "echo failing; exit 3\n"})
	var ids []string
	for range 2 {
		_, id := execSync(t, c, "counted")
		ids = append(ids, id)
	}
	_, id := execSync(t, c, "failing")
	ids = append(ids, id)
	asyncID := execAsync(t, c, "counted")
	ids = append(ids, asyncID)
	waitRecord(t, c, asyncID, 30*time.Second, "final status", isFinal)

	// The async execution's metrics are recorded just after its final
	// record; wait for them rather than racing.
	var after map[string]float64
	finishedAsync := `flux_executions_finished_total{function="counted",status="success"}`
	waitUntil(10*time.Second, func() bool {
		after = metricsSample(t, a)
		return after[finishedAsync]-before[finishedAsync] >= 3
	})

	wantDelta := map[string]float64{
		`flux_executions_started_total{async="false",function="counted"}`: 2,
		`flux_executions_started_total{async="true",function="counted"}`:  1,
		`flux_executions_started_total{async="false",function="failing"}`: 1,
		finishedAsync: 3,
		`flux_executions_finished_total{function="failing",status="failed"}`:         1,
		`flux_execution_duration_seconds_count{function="counted",status="success"}`: 3,
		`flux_executions_output_bytes_total{function="counted"}`:                     3 * float64(len("counted\n")),
		`flux_deploys_total{function="counted",status="ok"}`:                         1,
		`flux_deploy_size_bytes_count{function="counted"}`:                           1,
		`flux_executions_running{function="counted"}`:                                0,
	}
	for series, want := range wantDelta {
		if got := after[series] - before[series]; got != want {
			t.Errorf("%s moved by %v, want %v", series, got, want)
		}
	}
	if after[`flux_node_memory_total_bytes`] <= 0 {
		t.Errorf("flux_node_memory_total_bytes = %v, want the node's memory", after[`flux_node_memory_total_bytes`])
	}
	_, body := httpGet(t, a.MetricsURL+"/metrics")
	if !strings.Contains(body, `flux_sandbox_isolation{cgroup="`) {
		t.Errorf("/metrics lacks flux_sandbox_isolation, the operator's view of what isolates functions")
	} else if !strings.Contains(body, `favordynmods="`) {
		t.Errorf("flux_sandbox_isolation lacks its favordynmods label (whether the host made cgroup moves cheap)")
	}
	for _, id := range ids {
		if strings.Contains(body, id) {
			t.Errorf("/metrics mentions execution id %s: labels must stay bounded", id)
		}
	}
}

// silentCollector accepts connections and never answers: a collector that
// hangs rather than refuses.
func silentCollector(t testing.TB) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return lis.Addr().String()
}

// closedCollector is a loopback address nothing listens on.
func closedCollector(t testing.TB) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
}

// collectorCases are the agents compared for latency: without a collector,
// with its port closed, and with one that accepts and never answers. Every
// agent exports as often as it can and waits long for each export, so an
// execution that waited on telemetry would show it.
var collectorCases = []struct {
	name     string
	endpoint func(testing.TB) string
}{
	{name: "no-collector"},
	{name: "closed-port", endpoint: closedCollector},
	{name: "silent-collector", endpoint: silentCollector},
}

func startAgentWithCollector(t testing.TB, endpoint func(testing.TB) string) fluxpb.AgentServiceClient {
	t.Helper()
	rs := startRedis(t)
	opts := agentOptions{Env: []string{"OTEL_BSP_SCHEDULE_DELAY=10", "OTEL_EXPORTER_OTLP_TIMEOUT=30000", "OTEL_METRIC_EXPORT_INTERVAL=100"}}
	if endpoint != nil {
		opts.YAML = telemetryYAML(endpoint(t), true)
	}
	a := startAgent(t, rs, opts)
	c := a.client(t)
	install(t, c, fn{Name: "quick", Script: "echo quick\n"})
	return c
}

// TestUnreachableCollectorKeepsExecutionLatency runs sync executions on
// agents whose collector is absent, refusing or hanging. Exports there take
// up to 30 s each; executions must not: none may take more than 10 s, and
// the median may grow by noise only.
func TestUnreachableCollectorKeepsExecutionLatency(t *testing.T) {
	const runs = 15
	medians := map[string]time.Duration{}
	for _, tc := range collectorCases {
		t.Run(tc.name, func(t *testing.T) {
			c := startAgentWithCollector(t, tc.endpoint)
			var took []time.Duration
			for range runs {
				start := time.Now()
				resp, _ := execSync(t, c, "quick")
				took = append(took, time.Since(start))
				if resp.GetError() != "" {
					t.Fatalf("execution failed: %q", resp.GetError())
				}
			}
			slices.Sort(took)
			medians[tc.name] = took[runs/2]
			t.Logf("%d sync executions: median %v, max %v", runs, took[runs/2], took[runs-1])
			if took[runs-1] > 10*time.Second {
				t.Errorf("slowest execution took %v: it waited on telemetry export", took[runs-1])
			}
		})
	}
	base, ok := medians["no-collector"]
	if !ok {
		return
	}
	for name, median := range medians {
		if limit := 2*base + 500*time.Millisecond; median > limit {
			t.Errorf("%s: median %v exceeds %v (twice the %v without a collector, plus 500ms)", name, median, limit, base)
		}
	}
}

// BenchmarkSyncExecution measures a sync execution end to end (gRPC, Redis
// record, sandbox, output) with each collector case:
//
//	go test ./e2e -run '^$' -bench SyncExecution -benchtime 50x
func BenchmarkSyncExecution(b *testing.B) {
	for _, tc := range collectorCases {
		b.Run(tc.name, func(b *testing.B) {
			c := startAgentWithCollector(b, tc.endpoint)
			for b.Loop() {
				if resp, _ := execSync(b, c, "quick"); resp.GetError() != "" {
					b.Fatalf("execution failed: %q", resp.GetError())
				}
			}
		})
	}
}
