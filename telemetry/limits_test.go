package telemetry

import (
	"context"
	"io"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
)

// TestSetupBoundsSpansAndCountsDrops goes through Setup and a real OTLP
// exporter: a span with more and longer attributes than the caps arrives
// cut to them, and spans beyond the configured byte budget are dropped and
// show in /metrics.
func TestSetupBoundsSpansAndCountsDrops(t *testing.T) {
	clearOTelEnv(t)
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000") // export on flush only
	t.Setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "100000")
	addr, collector := startGRPCCollector(t)
	tel, err := Setup(context.Background(), Config{OTLPEndpoint: addr, OTLPInsecure: true, ExportQueueBytes: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	tracer := tel.TracerProvider.Tracer(ScopeName)

	_, span := tracer.Start(context.Background(), SpanExecution)
	for i := range 2 * capAttributes {
		span.SetAttributes(attribute.String("attr."+strconv.Itoa(i), strings.Repeat("x", 10_000)))
	}
	span.End()
	const spans = 500 // ~4 KiB each with the attribute above: past 256 KiB
	for range spans {
		_, span := tracer.Start(context.Background(), SpanSandboxStart)
		span.SetAttributes(attribute.String("attr", strings.Repeat("y", 4000)))
		span.End()
	}

	rec := httptest.NewRecorder()
	tel.PrometheusHandler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	m := regexp.MustCompile(`flux_telemetry_spans_dropped_total\{reason="queue_full"\} (\d+)`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no queue_full drop count in /metrics:\n%s", body)
	}
	dropped, _ := strconv.Atoi(string(m[1]))
	if !strings.Contains(string(body), "flux_telemetry_span_queue_used_bytes") {
		t.Errorf("no span queue gauge in /metrics")
	}

	if err := tel.Shutdown(shutdownCtx(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	got, _, _ := collector.received()
	if dropped == 0 || len(got)+dropped != spans+1 {
		t.Errorf("collector got %d spans and %d were dropped, want %d in all with some dropped", len(got), dropped, spans+1)
	}
	if len(got) == 0 || got[0].Name != SpanExecution {
		t.Fatalf("first span not exported: %d spans", len(got))
	}
	if n := len(got[0].Attributes); n != capAttributes {
		t.Errorf("span exported with %d attributes, want the cap %d", n, capAttributes)
	}
	for k, v := range got[0].Attributes {
		if len(v) != capAttributeValueLength {
			t.Errorf("attribute %s exported with %d bytes, want the cap %d", k, len(v), capAttributeValueLength)
		}
	}
}
