package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// DefaultExportQueueBytes is the memory ended spans may take while they wait
// for export (and while one batch of them is being exported), unless
// Config.ExportQueueBytes says otherwise. Beyond it spans are dropped.
const DefaultExportQueueBytes = 16 << 20

// Defaults of the OTEL_BSP_* settings, as the SDK's batch processor has them.
const (
	defaultScheduleDelay = 5 * time.Second
	defaultExportTimeout = 30 * time.Second
	defaultMaxQueueSpans = 2048
	defaultBatchSpans    = 512
)

// maxBatchBytes ends a batch early when its spans are large: an OTLP
// collector refuses a request over 4 MiB by default, which would lose the
// whole batch.
const maxBatchBytes = 2 << 20

// What holding a span costs beyond its strings, for the byte budget: the
// SDK's snapshot of a span with its ids, times and slice headers, one
// attribute.KeyValue, one event, one link. Rounded up from their Go sizes.
const (
	spanOverheadBytes  = 512
	attrOverheadBytes  = 64
	eventOverheadBytes = 96
	linkOverheadBytes  = 96
)

// Reasons a span was dropped, the reason label of the dropped-spans metric.
const (
	dropQueueFull    = "queue_full"
	dropExportFailed = "export_failed"
)

// queueOptions shape a spanQueue.
type queueOptions struct {
	budgetBytes   int64         // spans held (queued or being exported), in bytes
	maxSpans      int           // spans queued, by count (OTEL_BSP_MAX_QUEUE_SIZE)
	batchSpans    int           // spans per export (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
	batchBytes    int64         // bytes per export
	delay         time.Duration // longest wait before a partial batch goes (OTEL_BSP_SCHEDULE_DELAY)
	exportTimeout time.Duration // one export (OTEL_BSP_EXPORT_TIMEOUT)
	valueLength   int           // longest string the queue lets through in events, links, status
}

// queueOptionsFromEnv reads the OTEL_BSP_* variables the way the SDK's batch
// processor does (milliseconds, positive integers; anything else is the
// default) and sets the byte budget: budget when positive, else the default.
func queueOptionsFromEnv(budget int64, valueLength int) queueOptions {
	if budget <= 0 {
		budget = DefaultExportQueueBytes
	}
	o := queueOptions{
		budgetBytes:   budget,
		maxSpans:      envPositive("OTEL_BSP_MAX_QUEUE_SIZE", defaultMaxQueueSpans),
		batchSpans:    envPositive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaultBatchSpans),
		batchBytes:    min(maxBatchBytes, budget),
		delay:         time.Duration(envPositive("OTEL_BSP_SCHEDULE_DELAY", int(defaultScheduleDelay/time.Millisecond))) * time.Millisecond,
		exportTimeout: time.Duration(envPositive("OTEL_BSP_EXPORT_TIMEOUT", int(defaultExportTimeout/time.Millisecond))) * time.Millisecond,
		valueLength:   valueLength,
	}
	o.batchSpans = min(o.batchSpans, o.maxSpans)
	return o
}

func envPositive(name string, def int) int {
	v, ok := lookupEnv(name)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n <= 0 {
		return def
	}
	return n
}

// spanQueue is the span processor between the SDK and the exporter: a queue
// bounded in bytes as well as in spans, exported in batches by one
// goroutine. Ending a span never waits: when the budget is spent the span is
// dropped, counted, and the first drop of a burst is logged.
//
// A span's bytes count from its end until the export that carries it
// returns, so the budget also covers the batch in flight. Before a span is
// queued its strings are cut and detached (see boundSpan), so the largest
// span is bounded and what it holds is what it is counted for.
type spanQueue struct {
	exporter sdktrace.SpanExporter
	opts     queueOptions
	logger   *slog.Logger

	mu        sync.Mutex
	queue     []queuedSpan
	held      int64 // bytes queued or being exported
	exporting int64 // bytes being exported
	closed    bool
	dropping  bool // in a burst of drops, whose first was logged

	failing bool // the last export failed; touched by the export goroutine only

	droppedFull   atomic.Int64
	droppedExport atomic.Int64
	heldGauge     atomic.Int64

	wake         chan struct{} // a full batch waits (capacity 1)
	flushes      chan chan struct{}
	stop         chan struct{}
	done         chan struct{}
	exportCtx    context.Context
	cancelExport context.CancelFunc

	shutdownOnce sync.Once
}

type queuedSpan struct {
	span  sdktrace.ReadOnlySpan
	bytes int64
}

var _ sdktrace.SpanProcessor = (*spanQueue)(nil)

// newSpanQueue starts the queue's export goroutine; Shutdown stops it.
func newSpanQueue(exporter sdktrace.SpanExporter, opts queueOptions, logger *slog.Logger) *spanQueue {
	q := &spanQueue{
		exporter: exporter,
		opts:     opts,
		logger:   logger,
		wake:     make(chan struct{}, 1),
		flushes:  make(chan chan struct{}),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	q.exportCtx, q.cancelExport = context.WithCancel(context.Background())
	go q.run()
	return q
}

// OnStart does nothing: a span is queued when it ends.
func (q *spanQueue) OnStart(context.Context, sdktrace.ReadWriteSpan) {}

// OnEnd queues a sampled span, or drops it when the queue is full.
func (q *spanQueue) OnEnd(s sdktrace.ReadOnlySpan) {
	if !s.SpanContext().IsSampled() {
		return
	}
	s = boundSpan(s, q.opts.valueLength)
	size := spanBytes(s)

	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	if q.held+size > q.opts.budgetBytes || len(q.queue) >= q.opts.maxSpans {
		first := !q.dropping
		q.dropping = true
		q.mu.Unlock()
		q.droppedFull.Add(1)
		if first {
			q.logger.Warn("telemetry: span export queue full; dropping spans until it drains (counted in flux_telemetry_spans_dropped_total)",
				"budget_bytes", q.opts.budgetBytes, "max_spans", q.opts.maxSpans, "span_bytes", size)
		}
		return
	}
	q.dropping = false
	q.queue = append(q.queue, queuedSpan{span: s, bytes: size})
	q.held += size
	q.heldGauge.Store(q.held)
	full := q.fullBatchLocked()
	q.mu.Unlock()
	if full {
		q.signal()
	}
}

// fullBatchLocked reports whether a batch as large as one export takes is
// waiting.
func (q *spanQueue) fullBatchLocked() bool {
	return len(q.queue) >= q.opts.batchSpans || q.held-q.exporting >= q.opts.batchBytes
}

func (q *spanQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// run exports a batch when one is full, everything queued every delay, on
// ForceFlush, and at Shutdown.
func (q *spanQueue) run() {
	defer close(q.done)
	timer := time.NewTimer(q.opts.delay)
	defer timer.Stop()
	for {
		select {
		case <-q.stop:
			q.exportQueued()
			return
		case reply := <-q.flushes:
			q.exportQueued()
			close(reply)
		case <-q.wake:
			// One batch per wake-up, so a stop or a flush is not starved by
			// spans that keep coming.
			q.export(q.take())
			q.mu.Lock()
			full := q.fullBatchLocked()
			q.mu.Unlock()
			if full {
				q.signal()
			}
		case <-timer.C:
			q.exportQueued()
			timer.Reset(q.opts.delay)
		}
	}
}

// exportQueued exports the spans queued now, batch by batch. After Shutdown
// gave up (its context ended), what is left is dropped.
func (q *spanQueue) exportQueued() {
	q.mu.Lock()
	pending := len(q.queue)
	q.mu.Unlock()
	for pending > 0 {
		batch := q.take()
		if len(batch) == 0 {
			return
		}
		pending -= len(batch)
		if q.exportCtx.Err() != nil {
			q.release(batch)
			q.droppedExport.Add(int64(len(batch)))
			continue
		}
		q.export(batch)
	}
}

// take moves the oldest spans, at most one batch's worth, to the export in
// flight; they stay counted in held until released.
func (q *spanQueue) take() []queuedSpan {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	var bytes int64
	for n < len(q.queue) && n < q.opts.batchSpans {
		if n > 0 && bytes+q.queue[n].bytes > q.opts.batchBytes {
			break
		}
		bytes += q.queue[n].bytes
		n++
	}
	batch := make([]queuedSpan, n)
	copy(batch, q.queue)
	clear(q.queue[:n]) // let the spans go once exported
	q.queue = q.queue[n:]
	q.exporting += bytes
	return batch
}

// release gives back the bytes of an exported (or abandoned) batch.
func (q *spanQueue) release(batch []queuedSpan) {
	var bytes int64
	for _, s := range batch {
		bytes += s.bytes
	}
	q.mu.Lock()
	q.held -= bytes
	q.exporting -= bytes
	q.heldGauge.Store(q.held)
	q.mu.Unlock()
}

// export sends one batch with the export timeout. A failed batch is dropped
// (the exporter has retried within the timeout) and counted; the first
// failure of an outage and its end are logged.
func (q *spanQueue) export(batch []queuedSpan) {
	if len(batch) == 0 {
		return
	}
	spans := make([]sdktrace.ReadOnlySpan, len(batch))
	for i, s := range batch {
		spans[i] = s.span
	}
	ctx, cancel := context.WithTimeout(q.exportCtx, q.opts.exportTimeout)
	err := q.exporter.ExportSpans(ctx, spans)
	cancel()
	q.release(batch)
	q.noteExport(len(batch), err)
}

// noteExport counts the spans of a failed export and logs the edges of an
// outage: its first failure and the first export that works again.
func (q *spanQueue) noteExport(spans int, err error) {
	if err != nil {
		q.droppedExport.Add(int64(spans))
		if !q.failing {
			q.failing = true
			q.logger.Warn("telemetry: span export failed; dropping spans until the collector answers (counted in flux_telemetry_spans_dropped_total)",
				"spans", spans, "err", err)
		}
		return
	}
	if q.failing {
		q.failing = false
		q.logger.Info("telemetry: span export works again")
	}
}

// ForceFlush exports everything queued now and returns when that is done or
// ctx ends.
func (q *spanQueue) ForceFlush(ctx context.Context) error {
	reply := make(chan struct{})
	select {
	case q.flushes <- reply:
	case <-q.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-reply:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown stops queueing, exports what is queued until ctx ends (then
// abandons the export in flight and drops the rest), stops the export
// goroutine and shuts the exporter down. Later calls do nothing.
func (q *spanQueue) Shutdown(ctx context.Context) error {
	var err error
	q.shutdownOnce.Do(func() {
		q.mu.Lock()
		q.closed = true
		q.mu.Unlock()
		close(q.stop)
		select {
		case <-q.done:
		case <-ctx.Done():
			q.cancelExport()
			<-q.done
		}
		q.cancelExport()
		if e := q.exporter.Shutdown(ctx); e != nil && !errors.Is(e, ctx.Err()) {
			err = fmt.Errorf("span exporter shutdown: %w", e)
		}
	})
	return err
}

// dropped returns how many spans were dropped for reason.
func (q *spanQueue) dropped(reason string) int64 {
	if reason == dropExportFailed {
		return q.droppedExport.Load()
	}
	return q.droppedFull.Load()
}

// spanBytes is what holding s costs, by the overheads above plus its
// strings. It counts everything the span refers to except its resource and
// scope, which all spans share.
func spanBytes(s sdktrace.ReadOnlySpan) int64 {
	n := int64(spanOverheadBytes + len(s.Name()) + len(s.Status().Description))
	n += attrsBytes(s.Attributes())
	for _, e := range s.Events() {
		n += eventOverheadBytes + int64(len(e.Name)) + attrsBytes(e.Attributes)
	}
	for _, l := range s.Links() {
		n += linkOverheadBytes + attrsBytes(l.Attributes)
	}
	return n
}

func attrsBytes(attrs []attribute.KeyValue) int64 {
	var n int64
	for _, a := range attrs {
		n += attrOverheadBytes + int64(len(a.Key)) + valueBytes(a.Value)
	}
	return n
}

// valueBytes is the memory a value refers to beyond its attribute.Value.
func valueBytes(v attribute.Value) int64 {
	switch v.Type() {
	case attribute.STRING:
		return int64(len(v.AsString()))
	case attribute.BYTESLICE:
		return int64(len(v.AsByteSlice()))
	case attribute.STRINGSLICE:
		var n int64
		for _, s := range v.AsStringSlice() {
			n += 16 + int64(len(s))
		}
		return n
	case attribute.BOOLSLICE:
		return int64(len(v.AsBoolSlice()))
	case attribute.INT64SLICE:
		return 8 * int64(len(v.AsInt64Slice()))
	case attribute.FLOAT64SLICE:
		return 8 * int64(len(v.AsFloat64Slice()))
	case attribute.SLICE:
		var n int64
		for _, e := range v.AsSlice() {
			n += attrOverheadBytes + valueBytes(e)
		}
		return n
	case attribute.MAP:
		return attrsBytes(v.AsMap())
	default:
		return 0
	}
}

// boundSpan returns s, or a copy of it in which every string is at most
// limit bytes (the span name capSpanNameLength) and refers to no longer
// string. The SDK leaves event and link attributes, the status description
// and the name unbounded, and it cuts span attributes by slicing, which
// keeps the whole original alive as long as the span: a 1 MiB value cut to
// 1 KiB would still cost 1 MiB in the queue. tracetest's SpanStub is the
// SDK's public way to build a ReadOnlySpan from parts.
func boundSpan(s sdktrace.ReadOnlySpan, limit int) sdktrace.ReadOnlySpan {
	if limit < 0 {
		limit = capAttributeValueLength
	}
	attrs, attrsCut := boundAttrs(s.Attributes(), limit)
	events, eventsCut := boundEvents(s.Events(), limit)
	links, linksCut := boundLinks(s.Links(), limit)
	status := s.Status()
	statusCut := mayBeCut(status.Description, limit)
	nameCut := mayBeCut(s.Name(), capSpanNameLength)
	if !attrsCut && !eventsCut && !linksCut && !statusCut && !nameCut {
		return s
	}
	stub := tracetest.SpanStubFromReadOnlySpan(s)
	stub.Name = detach(stub.Name, capSpanNameLength)
	stub.Attributes = attrs
	stub.Events = events
	stub.Links = links
	stub.Status.Description = detach(status.Description, limit)
	return stub.Snapshot()
}

func boundEvents(events []sdktrace.Event, limit int) ([]sdktrace.Event, bool) {
	var out []sdktrace.Event
	for i, e := range events {
		attrs, cut := boundAttrs(e.Attributes, limit)
		if !cut && !mayBeCut(e.Name, capSpanNameLength) {
			continue
		}
		if out == nil {
			out = slices.Clone(events)
		}
		out[i].Name = detach(e.Name, capSpanNameLength)
		out[i].Attributes = attrs
	}
	if out == nil {
		return events, false
	}
	return out, true
}

func boundLinks(links []sdktrace.Link, limit int) ([]sdktrace.Link, bool) {
	var out []sdktrace.Link
	for i, l := range links {
		attrs, cut := boundAttrs(l.Attributes, limit)
		if !cut {
			continue
		}
		if out == nil {
			out = slices.Clone(links)
		}
		out[i].Attributes = attrs
	}
	if out == nil {
		return links, false
	}
	return out, true
}

// boundAttrs returns attrs with every value bounded by boundValue, and
// whether anything changed (then the slice is a new one).
func boundAttrs(attrs []attribute.KeyValue, limit int) ([]attribute.KeyValue, bool) {
	var out []attribute.KeyValue
	for i, a := range attrs {
		v, cut := boundValue(a.Value, limit)
		if !cut {
			continue
		}
		if out == nil {
			out = slices.Clone(attrs)
		}
		out[i].Value = v
	}
	if out == nil {
		return attrs, false
	}
	return out, true
}

// boundValue returns v with its strings detached (see detach), and whether
// any needed it. Byte slices are copies already and need only the cut.
func boundValue(v attribute.Value, limit int) (attribute.Value, bool) {
	switch v.Type() {
	case attribute.STRING:
		if s := v.AsString(); mayBeCut(s, limit) {
			return attribute.StringValue(detach(s, limit)), true
		}
	case attribute.BYTESLICE:
		if b := v.AsByteSlice(); len(b) > limit {
			return attribute.ByteSliceValue(b[:limit]), true
		}
	case attribute.STRINGSLICE:
		ss := v.AsStringSlice() // a copy
		cut := false
		for i, s := range ss {
			if mayBeCut(s, limit) {
				ss[i], cut = detach(s, limit), true
			}
		}
		if cut {
			return attribute.StringSliceValue(ss), true
		}
	case attribute.SLICE:
		vs := v.AsSlice() // a copy
		cut := false
		for i, e := range vs {
			if b, c := boundValue(e, limit); c {
				vs[i], cut = b, true
			}
		}
		if cut {
			return attribute.SliceValue(vs...), true
		}
	case attribute.MAP:
		if kvs, cut := boundAttrs(v.AsMap(), limit); cut {
			return attribute.MapValue(kvs...), true
		}
	}
	return v, false
}

// mayBeCut reports whether s is over limit, or so close to it that it may
// be a cut of a longer string (a cut at a character boundary is up to three
// bytes short of the limit).
func mayBeCut(s string, limit int) bool {
	return len(s) > limit-utf8.UTFMax
}

// detach returns a copy of s cut to at most limit bytes at a character
// boundary: a copy, so that it does not keep a longer original alive.
func detach(s string, limit int) string {
	if len(s) > limit {
		n := limit
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		s = s[:n]
	}
	return strings.Clone(s)
}
