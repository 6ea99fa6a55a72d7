package telemetry

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// heldExporter exports only once released, as a collector that hangs does,
// and keeps what it exported.
type heldExporter struct {
	release chan struct{}
	mu      sync.Mutex
	spans   []sdktrace.ReadOnlySpan
}

func newHeldExporter() *heldExporter { return &heldExporter{release: make(chan struct{})} }

func (e *heldExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	select {
	case <-e.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.spans = append(e.spans, spans...)
	return nil
}

func (e *heldExporter) Shutdown(context.Context) error { return nil }

func (e *heldExporter) exported() []sdktrace.ReadOnlySpan {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]sdktrace.ReadOnlySpan(nil), e.spans...)
}

// lockedBuffer is a log destination safe for the queue's goroutine.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), s)
}

// testQueue is a spanQueue with a long delay (exports happen only on full
// batches, flushes and shutdown) and the production span limits.
func testQueue(t *testing.T, exporter sdktrace.SpanExporter, budget int64) (*spanQueue, trace.Tracer, *lockedBuffer) {
	t.Helper()
	logs := &lockedBuffer{}
	opts := queueOptions{
		budgetBytes:   budget,
		maxSpans:      defaultMaxQueueSpans,
		batchSpans:    defaultBatchSpans,
		batchBytes:    min(maxBatchBytes, budget),
		delay:         time.Hour,
		exportTimeout: time.Minute,
		valueLength:   capAttributeValueLength,
	}
	q := newSpanQueue(exporter, opts, slog.New(slog.NewTextHandler(logs, nil)))
	tp := sdktrace.NewTracerProvider(sdktrace.WithRawSpanLimits(spanLimits()), sdktrace.WithSpanProcessor(q))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tp.Shutdown(ctx)
		_ = q.Shutdown(ctx)
	})
	return q, tp.Tracer("test"), logs
}

// fresh returns a new string of n bytes, so that keeping it costs n bytes of
// heap that nothing else shares.
func fresh(n int, fill byte) string {
	return string(bytes.Repeat([]byte{fill}, n))
}

// endHugeSpan ends a span whose name, span attribute, event attribute and
// status description are each 1 MiB: the SDK bounds only the span
// attribute.
func endHugeSpan(tracer trace.Tracer) {
	_, span := tracer.Start(context.Background(), fresh(1<<20, 'n'))
	span.SetAttributes(attribute.String("big.attribute", fresh(1<<20, 'a')))
	span.AddEvent(fresh(1<<20, 'e'), trace.WithAttributes(attribute.String("exception.message", fresh(1<<20, 'm'))))
	span.SetStatus(codes.Error, fresh(1<<20, 's'))
	span.End()
}

func (q *spanQueue) heldBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.held
}

func (q *spanQueue) queued() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.queue)
}

// TestSpanQueueHoldsItsByteBudgetWithHugeSpans ends 4 MiB spans while the
// collector hangs: the queue never holds more than its budget, the heap does
// not keep the spans' oversized parts, the rest is dropped and counted with
// one log line for the burst, and what is exported is cut to the limits.
func TestSpanQueueHoldsItsByteBudgetWithHugeSpans(t *testing.T) {
	const budget = 256 << 10
	exporter := newHeldExporter()
	q, tracer, logs := testQueue(t, exporter, budget)

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	const spans = 100 // 400 MiB of strings if the queue kept them
	for range spans {
		endHugeSpan(tracer)
		if held := q.heldBytes(); held > budget {
			t.Fatalf("queue holds %d bytes, budget %d", held, budget)
		}
	}

	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d spans of 4 MiB ended: %d queued in %d bytes, %d dropped; heap grew %d KiB",
		spans, q.queued(), q.heldBytes(), q.dropped(dropQueueFull), grown>>10)
	if grown > 8<<20 {
		t.Errorf("heap grew by %d MiB holding spans under a %d KiB budget: oversized parts are still referenced", grown>>20, budget>>10)
	}
	queued := q.queued()
	if queued == 0 || q.dropped(dropQueueFull) != int64(spans-queued) {
		t.Errorf("queued %d, dropped %d: want some queued and the other %d dropped", queued, q.dropped(dropQueueFull), spans-queued)
	}
	if n := logs.count("span export queue full"); n != 1 {
		t.Errorf("%d log lines about the full queue in one burst, want 1:\n%s", n, logs.buf.String())
	}

	close(exporter.release)
	if err := q.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := exporter.exported()
	if len(got) != queued {
		t.Fatalf("exported %d spans, want the %d queued", len(got), queued)
	}
	for _, s := range got {
		if len(s.Name()) > capSpanNameLength || len(s.Status().Description) > capAttributeValueLength {
			t.Errorf("exported span name %d bytes, status %d bytes", len(s.Name()), len(s.Status().Description))
		}
		for _, a := range s.Attributes() {
			if len(a.Value.AsString()) > capAttributeValueLength {
				t.Errorf("attribute %s: %d bytes", a.Key, len(a.Value.AsString()))
			}
		}
		for _, e := range s.Events() {
			for _, a := range e.Attributes {
				if len(e.Name) > capSpanNameLength || len(a.Value.AsString()) > capAttributeValueLength {
					t.Errorf("event %d bytes, attribute %s %d bytes", len(e.Name), a.Key, len(a.Value.AsString()))
				}
			}
		}
	}
	if held := q.heldBytes(); held != 0 {
		t.Errorf("queue still holds %d bytes after everything was exported", held)
	}

	// A second burst is a second line.
	for range 2 * spans {
		endHugeSpan(tracer)
	}
	if n := logs.count("span export queue full"); n != 2 {
		t.Errorf("%d log lines after two bursts, want 2", n)
	}
}

// TestSpanQueueNeverBlocks ends many spans with the export hung: every End
// returns at once, and Shutdown gives up when its context ends.
func TestSpanQueueNeverBlocks(t *testing.T) {
	exporter := newHeldExporter()
	q, tracer, _ := testQueue(t, exporter, 1<<20)
	start := time.Now()
	for i := range 20_000 {
		_, span := tracer.Start(context.Background(), SpanExecution)
		span.SetAttributes(AttrExecutionID.Int(i))
		span.End()
	}
	t.Logf("20000 spans ended in %v with the export hung; %d dropped", time.Since(start), q.dropped(dropQueueFull))
	if q.dropped(dropQueueFull) == 0 {
		t.Error("no span dropped with the export hung")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- q.Shutdown(ctx) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after its context ended")
	}
	if q.dropped(dropExportFailed) == 0 {
		t.Error("spans abandoned at shutdown not counted")
	}
}

// TestSpanQueueExportsInBoundedBatches: large spans go out in batches that
// stay under a collector's default message limit, and the flush exports
// them all.
func TestSpanQueueExportsInBoundedBatches(t *testing.T) {
	exporter := &batchRecorder{}
	q, tracer, _ := testQueue(t, exporter, 64<<20)
	const spans = 100
	for range spans {
		_, span := tracer.Start(context.Background(), SpanExecution)
		for i := range capAttributes {
			span.SetAttributes(attribute.String(strings.Repeat("k", 8)+string(rune('a'+i%26))+string(rune('a'+i/26)), fresh(4096, 'v')))
		}
		span.End()
	}
	if err := q.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, b := range exporter.batches {
		total += len(b)
		var bytes int64
		for _, s := range b {
			bytes += spanBytes(s)
		}
		if bytes > maxBatchBytes {
			t.Errorf("a batch of %d spans holds %d bytes, over %d", len(b), bytes, maxBatchBytes)
		}
	}
	if total != spans {
		t.Errorf("exported %d spans, want %d", total, spans)
	}
	t.Logf("%d spans of ~%d KiB went in %d batches", spans, spanBytes(exporter.batches[0][0])>>10, len(exporter.batches))
}

type batchRecorder struct {
	mu      sync.Mutex
	batches [][]sdktrace.ReadOnlySpan
}

func (r *batchRecorder) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.batches = append(r.batches, spans)
	return nil
}

func (r *batchRecorder) Shutdown(context.Context) error { return nil }

// TestSpanQueueLogsAnExportOutageOnce: failing exports are counted and
// logged once, and their end is logged.
func TestSpanQueueLogsAnExportOutageOnce(t *testing.T) {
	exporter := &failingExporter{}
	q, tracer, logs := testQueue(t, exporter, 1<<20)
	exporter.fail.Store(true)
	for range 3 {
		_, span := tracer.Start(context.Background(), SpanExecution)
		span.End()
		if err := q.ForceFlush(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	exporter.fail.Store(false)
	_, span := tracer.Start(context.Background(), SpanExecution)
	span.End()
	if err := q.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := q.dropped(dropExportFailed); got != 3 {
		t.Errorf("%d spans counted as failed exports, want 3", got)
	}
	if n, m := logs.count("span export failed"), logs.count("span export works again"); n != 1 || m != 1 {
		t.Errorf("%d failure lines and %d recovery lines, want 1 and 1:\n%s", n, m, logs.buf.String())
	}
}

type failingExporter struct {
	fail atomic.Bool
}

func (e *failingExporter) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error {
	if e.fail.Load() {
		return errors.New("collector unavailable")
	}
	return nil
}

func (e *failingExporter) Shutdown(context.Context) error { return nil }

func TestSpanLimitsEnvironmentLowersNeverLifts(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		want sdktrace.SpanLimits
	}{
		{name: "defaults are the caps", want: capsLimits()},
		{name: "unlimited is the cap", env: map[string]string{
			"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "-1", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-1",
			"OTEL_SPAN_EVENT_COUNT_LIMIT": "-1"}, want: capsLimits()},
		{name: "higher is the cap", env: map[string]string{
			"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100000", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "1000",
			"OTEL_SPAN_EVENT_COUNT_LIMIT": "1000", "OTEL_SPAN_LINK_COUNT_LIMIT": "1000",
			"OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "1000", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": "1000"}, want: capsLimits()},
		{name: "lower is kept", env: map[string]string{
			"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "10",
			"OTEL_SPAN_EVENT_COUNT_LIMIT": "0", "OTEL_SPAN_LINK_COUNT_LIMIT": "2",
			"OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "3", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": "4"},
			want: sdktrace.SpanLimits{AttributeValueLengthLimit: 100, AttributeValueDepthLimit: capAttributeDepth,
				AttributeCountLimit: 10, EventCountLimit: 0, LinkCountLimit: 2,
				AttributePerEventCountLimit: 3, AttributePerLinkCountLimit: 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, name := range []string{"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
				"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT",
				"OTEL_SPAN_LINK_COUNT_LIMIT", "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT"} {
				t.Setenv(name, tc.env[name])
			}
			if diff := cmp.Diff(tc.want, spanLimits()); diff != "" {
				t.Errorf("span limits (-want +got):\n%s", diff)
			}
		})
	}
}

func capsLimits() sdktrace.SpanLimits {
	return sdktrace.SpanLimits{
		AttributeValueLengthLimit: capAttributeValueLength, AttributeValueDepthLimit: capAttributeDepth,
		AttributeCountLimit: capAttributes, EventCountLimit: capEvents, LinkCountLimit: capLinks,
		AttributePerEventCountLimit: capAttributesPerEvent, AttributePerLinkCountLimit: capAttributesPerLink,
	}
}
