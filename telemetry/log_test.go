package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.opentelemetry.io/otel/trace"
)

// spanContext returns a context holding a span with fixed ids, as an
// incoming traceparent or an active span would.
func spanContext(t *testing.T) context.Context {
	t.Helper()
	traceID, err := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	if err != nil {
		t.Fatal(err)
	}
	spanID, err := trace.SpanIDFromHex("00f067aa0ba902b7")
	if err != nil {
		t.Fatal(err)
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled})
	return trace.ContextWithSpanContext(context.Background(), sc)
}

func TestJSONLoggerAddsTraceIDs(t *testing.T) {
	var buf bytes.Buffer
	logger, err := NewLogger(&buf, "", "info")
	if err != nil {
		t.Fatal(err)
	}
	logger = logger.With(LogExecutionID, "e-1", LogFunction, "hello")

	logger.InfoContext(spanContext(t), "execution finished", "exit_code", 0)
	logger.Info("no span here")
	logger.DebugContext(spanContext(t), "below the level")

	var got []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var record map[string]any
		if err := json.Unmarshal([]byte(line), &record); err != nil {
			t.Fatalf("line %q is not JSON: %v", line, err)
		}
		if _, ok := record["time"]; !ok {
			t.Errorf("line %q has no time", line)
		}
		delete(record, "time")
		got = append(got, record)
	}
	want := []map[string]any{
		{
			"level": "INFO", "msg": "execution finished", "exit_code": 0.0,
			"execution_id": "e-1", "function": "hello",
			"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7",
		},
		{"level": "INFO", "msg": "no span here", "execution_id": "e-1", "function": "hello"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("log lines (-want +got):\n%s", diff)
	}
}

func TestTextLoggerAddsTraceIDs(t *testing.T) {
	var buf bytes.Buffer
	logger, err := NewLogger(&buf, "text", "DEBUG")
	if err != nil {
		t.Fatal(err)
	}
	logger.DebugContext(spanContext(t), "sandbox started", "pid", 42)

	line := buf.String()
	for _, part := range []string{"level=DEBUG", `msg="sandbox started"`, "pid=42",
		"trace_id=4bf92f3577b34da6a3ce929d0e0e4736", "span_id=00f067aa0ba902b7"} {
		if !strings.Contains(line, part) {
			t.Errorf("line %q lacks %s", line, part)
		}
	}
}

func TestNewLoggerRejectsUnknownSettings(t *testing.T) {
	tests := []struct {
		format, level string
		want          error
	}{
		{format: "xml", level: "info", want: ErrUnknownLogFormat},
		{format: "json", level: "verbose", want: ErrUnknownLogLevel},
	}
	for _, tt := range tests {
		if _, err := NewLogger(&bytes.Buffer{}, tt.format, tt.level); !errors.Is(err, tt.want) {
			t.Errorf("NewLogger(%q, %q) error = %v, want %v", tt.format, tt.level, err, tt.want)
		}
	}
}

// TestLogLineJoinsItsSpan checks the ids logged are those of a real SDK span,
// so a log line can be found from its trace in Jaeger and back.
func TestLogLineJoinsItsSpan(t *testing.T) {
	clearOTelEnv(t)
	tel, err := Setup(context.Background(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(shutdownCtx(t)) })

	var buf bytes.Buffer
	logger, err := NewLogger(&buf, "json", "info")
	if err != nil {
		t.Fatal(err)
	}
	ctx, span := tel.TracerProvider.Tracer(ScopeName).Start(context.Background(), SpanExecution)
	logger.InfoContext(ctx, "running")
	span.End()

	var record struct {
		TraceID string `json:"trace_id"`
		SpanID  string `json:"span_id"`
	}
	if err := json.Unmarshal(buf.Bytes(), &record); err != nil {
		t.Fatal(err)
	}
	want := struct{ TraceID, SpanID string }{span.SpanContext().TraceID().String(), span.SpanContext().SpanID().String()}
	if diff := cmp.Diff(want, struct{ TraceID, SpanID string }{record.TraceID, record.SpanID}); diff != "" {
		t.Errorf("logged ids (-want +got):\n%s", diff)
	}
}
