package telemetry

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// scrape returns the handler's Prometheus text output.
func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics status %d: %s", rec.Code, rec.Body.String())
	}
	body, err := io.ReadAll(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func TestMetricsAppearInPrometheusOutput(t *testing.T) {
	clearOTelEnv(t)
	tel, err := Setup(context.Background(), Config{AgentID: "agent-9", ServiceVersion: "0.1.0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tel.Shutdown(shutdownCtx(t)); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})

	before := scrape(t, tel.PrometheusHandler)
	if strings.Contains(before, `flux_executions_started_total{`) {
		t.Fatalf("a series exists before any instrument was used:\n%s", before)
	}

	ctx := context.Background()
	m := tel.Metrics
	m.ExecutionStarted(ctx, "hello", true)
	m.ExecutionStarted(ctx, "hello", true)
	m.QueuedAdd(ctx, "hello", 1)
	m.QueuedAdd(ctx, "hello", -1)
	m.RunningAdd(ctx, "hello", 1)
	m.ExecutionFinished(ctx, "hello", ExecutionOutcome{
		Status: StatusFailed, Duration: 1500 * time.Millisecond, OutputBytes: 42, OOMKilled: true,
	})
	m.ExecutionFinished(ctx, "hello", ExecutionOutcome{Status: StatusCancelled, Duration: time.Second, Cancelled: true})
	m.ExecutionFinished(ctx, "hello", ExecutionOutcome{Status: StatusFailed, Duration: time.Minute, TimedOut: true})
	m.Deployed(ctx, "hello", 3000, nil)
	m.Deployed(ctx, "broken", 10, errors.New("bad zip"))
	m.RedisError(ctx, "write_output")
	if err := m.ObserveNode(func(context.Context) (NodeSample, error) {
		return NodeSample{CPUPercent: 12.5, MemoryPercent: 50, MemoryUsedBytes: 4 << 30, MemoryTotalBytes: 8 << 30}, nil
	}); err != nil {
		t.Fatal(err)
	}

	got := scrape(t, tel.PrometheusHandler)
	want := []string{
		`flux_executions_started_total{async="true",function="hello"} 2`,
		`flux_executions_finished_total{function="hello",status="failed"} 2`,
		`flux_executions_finished_total{function="hello",status="cancelled"} 1`,
		`flux_execution_duration_seconds_count{function="hello",status="failed"} 2`,
		`flux_execution_duration_seconds_sum{function="hello",status="failed"} 61.5`,
		`flux_execution_duration_seconds_bucket{function="hello",status="failed",le="2.5"} 1`,
		`flux_executions_running{function="hello"} 1`,
		`flux_executions_queued{function="hello"} 0`,
		`flux_executions_oom_kills_total{function="hello"} 1`,
		`flux_executions_timeouts_total{function="hello"} 1`,
		`flux_executions_cancels_total{function="hello"} 1`,
		`flux_executions_output_bytes_total{function="hello"} 42`,
		`flux_deploys_total{function="hello",status="ok"} 1`,
		`flux_deploys_total{function="broken",status="failed"} 1`,
		`flux_deploy_size_bytes_sum{function="hello"} 3000`,
		`flux_redis_errors_total{operation="write_output"} 1`,
		`flux_node_cpu_usage_percent 12.5`,
		`flux_node_memory_usage_percent 50`,
		`flux_node_memory_used_bytes 4.294967296e+09`,
		`flux_node_memory_total_bytes 8.589934592e+09`,
		`flux_agent_id="agent-9"`, // target_info carries the resource
		`go_goroutines `,
	}
	for _, line := range want {
		if !strings.Contains(got, line) {
			t.Errorf("/metrics lacks %s", line)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", got)
	}
}

func TestObserveNodeSkipsFailedReads(t *testing.T) {
	clearOTelEnv(t)
	tel, err := Setup(context.Background(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(shutdownCtx(t)) })

	if err := tel.Metrics.ObserveNode(func(context.Context) (NodeSample, error) {
		return NodeSample{CPUPercent: 99}, nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := scrape(t, tel.PrometheusHandler); !strings.Contains(got, "flux_node_cpu_usage_percent 99") {
		t.Fatalf("first reader not observed:\n%s", got)
	}
	// A second reader replaces the first; a failing read reports nothing.
	if err := tel.Metrics.ObserveNode(func(context.Context) (NodeSample, error) {
		return NodeSample{}, errors.New("proc unreadable")
	}); err != nil {
		t.Fatal(err)
	}
	if got := scrape(t, tel.PrometheusHandler); strings.Contains(got, "flux_node_cpu_usage_percent ") {
		t.Errorf("node gauge reported after a failed read:\n%s", got)
	}
}

// BenchmarkExecutionMetrics measures what one execution costs in metrics:
// started, running up and down, finished.
func BenchmarkExecutionMetrics(b *testing.B) {
	b.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
	b.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
	tel, err := Setup(context.Background(), Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer tel.Shutdown(context.Background())
	ctx, m := context.Background(), tel.Metrics
	outcome := ExecutionOutcome{Status: StatusSuccess, Duration: 20 * time.Millisecond, OutputBytes: 100}
	b.ReportAllocs()
	for b.Loop() {
		m.ExecutionStarted(ctx, "hello", true)
		m.RunningAdd(ctx, "hello", 1)
		m.RunningAdd(ctx, "hello", -1)
		m.ExecutionFinished(ctx, "hello", outcome)
	}
}
