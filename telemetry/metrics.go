package telemetry

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Metric label keys. Their values are bounded: function names (as many as
// are deployed), statuses, Redis operation names and drop reasons, never
// execution ids.
const (
	labelFunction  = attribute.Key("function")
	labelStatus    = attribute.Key("status")
	labelAsync     = attribute.Key("async")
	labelOperation = attribute.Key("operation")
	labelReason    = attribute.Key("reason")
)

// Deploy outcomes, the status label of the deploys metric.
const (
	deployOK     = "ok"
	deployFailed = "failed"
)

// Histogram buckets chosen for what the agent runs: functions take from
// milliseconds to an hour, and code zips from a few KiB to a few hundred MiB.
var (
	durationBucketsSeconds = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}
	sizeBucketsBytes       = []float64{1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30}
)

// Metrics are the agent's instruments. Its methods are safe for concurrent
// use and cheap enough to call on every execution.
type Metrics struct {
	meter metric.Meter

	started    metric.Int64Counter
	finished   metric.Int64Counter
	duration   metric.Float64Histogram
	running    metric.Int64UpDownCounter
	queued     metric.Int64UpDownCounter
	oomKills   metric.Int64Counter
	timeouts   metric.Int64Counter
	cancels    metric.Int64Counter
	output     metric.Int64Counter
	blocked    metric.Int64Counter
	deploys    metric.Int64Counter
	deploySize metric.Int64Histogram
	redisErrs  metric.Int64Counter

	nodeCPU      metric.Float64ObservableGauge
	nodeMemory   metric.Float64ObservableGauge
	nodeMemUsed  metric.Int64ObservableGauge
	nodeMemTotal metric.Int64ObservableGauge

	mu           sync.Mutex
	nodeCallback metric.Registration
}

// NewMetrics creates the agent's instruments on provider. Setup calls it;
// tests of other packages can call it with a noop or SDK provider.
func NewMetrics(provider metric.MeterProvider, serviceVersion string) (*Metrics, error) {
	m := &Metrics{meter: provider.Meter(ScopeName, metric.WithInstrumentationVersion(serviceVersion))}
	var errs []error
	counter := func(name, unit, desc string) metric.Int64Counter {
		c, err := m.meter.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	upDown := func(name, unit, desc string) metric.Int64UpDownCounter {
		c, err := m.meter.Int64UpDownCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}

	m.started = counter("flux.executions.started", "{execution}", "Executions accepted, by function and async.")
	m.finished = counter("flux.executions.finished", "{execution}", "Executions finished, by function and status.")
	m.oomKills = counter("flux.executions.oom_kills", "{execution}", "Executions killed for exceeding their memory limit.")
	m.timeouts = counter("flux.executions.timeouts", "{execution}", "Executions killed at their timeout.")
	m.cancels = counter("flux.executions.cancels", "{execution}", "Executions cancelled by a caller.")
	m.output = counter("flux.executions.output", "By", "Output bytes written by functions.")
	m.blocked = counter("flux.network.blocked", "{connection}", "Connections of functions the network policy refused, by function.")
	m.deploys = counter("flux.deploys", "{deploy}", "Deploys, by function and status (ok or failed).")
	m.redisErrs = counter("flux.redis.errors", "{error}", "Failed Redis operations, by operation.")
	m.running = upDown("flux.executions.running", "{execution}", "Executions running now.")
	m.queued = upDown("flux.executions.queued", "{execution}", "Executions waiting for a slot now.")

	var err error
	m.duration, err = m.meter.Float64Histogram("flux.execution.duration", metric.WithUnit("s"),
		metric.WithDescription("Execution wall time from start to exit, by function and status."),
		metric.WithExplicitBucketBoundaries(durationBucketsSeconds...))
	errs = append(errs, err)
	m.deploySize, err = m.meter.Int64Histogram("flux.deploy.size", metric.WithUnit("By"),
		metric.WithDescription("Size of deployed code zips."),
		metric.WithExplicitBucketBoundaries(sizeBucketsBytes...))
	errs = append(errs, err)

	m.nodeCPU, err = m.meter.Float64ObservableGauge("flux.node.cpu.usage", metric.WithUnit("%"),
		metric.WithDescription("Node CPU use, percent of all cores."))
	errs = append(errs, err)
	m.nodeMemory, err = m.meter.Float64ObservableGauge("flux.node.memory.usage", metric.WithUnit("%"),
		metric.WithDescription("Node memory in use, percent of total."))
	errs = append(errs, err)
	m.nodeMemUsed, err = m.meter.Int64ObservableGauge("flux.node.memory.used", metric.WithUnit("By"),
		metric.WithDescription("Node memory in use."))
	errs = append(errs, err)
	m.nodeMemTotal, err = m.meter.Int64ObservableGauge("flux.node.memory.total", metric.WithUnit("By"),
		metric.WithDescription("Node memory in total."))
	errs = append(errs, err)

	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("create instruments: %w", err)
	}
	return m, nil
}

// ExecutionStarted counts an accepted execution.
func (m *Metrics) ExecutionStarted(ctx context.Context, function string, async bool) {
	m.started.Add(ctx, 1, metric.WithAttributes(labelFunction.String(function), labelAsync.Bool(async)))
}

// ExecutionOutcome is what ExecutionFinished records about one execution.
type ExecutionOutcome struct {
	// Status is StatusSuccess, StatusFailed or StatusCancelled.
	Status      string
	Duration    time.Duration
	OutputBytes int64
	OOMKilled   bool
	TimedOut    bool
	Cancelled   bool
	// NetworkBlocked counts connections the network policy refused.
	NetworkBlocked int64
}

// ExecutionFinished counts a finished execution and records its duration,
// output and how it ended.
func (m *Metrics) ExecutionFinished(ctx context.Context, function string, outcome ExecutionOutcome) {
	byFunction := metric.WithAttributes(labelFunction.String(function))
	byStatus := metric.WithAttributes(labelFunction.String(function), labelStatus.String(outcome.Status))
	m.finished.Add(ctx, 1, byStatus)
	m.duration.Record(ctx, outcome.Duration.Seconds(), byStatus)
	if outcome.OutputBytes > 0 {
		m.output.Add(ctx, outcome.OutputBytes, byFunction)
	}
	if outcome.OOMKilled {
		m.oomKills.Add(ctx, 1, byFunction)
	}
	if outcome.TimedOut {
		m.timeouts.Add(ctx, 1, byFunction)
	}
	if outcome.Cancelled {
		m.cancels.Add(ctx, 1, byFunction)
	}
	if outcome.NetworkBlocked > 0 {
		m.blocked.Add(ctx, outcome.NetworkBlocked, byFunction)
	}
}

// RunningAdd moves the running-executions gauge by delta (+1 at start, -1
// at exit).
func (m *Metrics) RunningAdd(ctx context.Context, function string, delta int64) {
	m.running.Add(ctx, delta, metric.WithAttributes(labelFunction.String(function)))
}

// QueuedAdd moves the queued-executions gauge by delta (+1 on queueing, -1
// when a slot is granted or the wait is abandoned).
func (m *Metrics) QueuedAdd(ctx context.Context, function string, delta int64) {
	m.queued.Add(ctx, delta, metric.WithAttributes(labelFunction.String(function)))
}

// Deployed counts a deploy and, when it succeeded, records its size.
func (m *Metrics) Deployed(ctx context.Context, function string, bytes int64, err error) {
	status := deployOK
	if err != nil {
		status = deployFailed
	}
	m.deploys.Add(ctx, 1, metric.WithAttributes(labelFunction.String(function), labelStatus.String(status)))
	if err == nil {
		m.deploySize.Record(ctx, bytes, metric.WithAttributes(labelFunction.String(function)))
	}
}

// RedisError counts a failed Redis operation. op names what the agent was
// doing ("create_record", "write_output", "finish_record", …), from a fixed
// set chosen by the caller.
func (m *Metrics) RedisError(ctx context.Context, op string) {
	m.redisErrs.Add(ctx, 1, metric.WithAttributes(labelOperation.String(op)))
}

// NodeSample is one reading of the node's CPU and memory.
type NodeSample struct {
	CPUPercent       float64
	MemoryPercent    float64
	MemoryUsedBytes  uint64
	MemoryTotalBytes uint64
}

// ObserveNode feeds the node gauges from read, which is called at each
// collection (each /metrics scrape or push). A failing read leaves the
// gauges out of that collection rather than reporting stale values. A
// second call replaces the first reader.
func (m *Metrics) ObserveNode(read func(context.Context) (NodeSample, error)) error {
	reg, err := m.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		sample, err := read(ctx)
		if err != nil {
			return fmt.Errorf("read node status: %w", err)
		}
		o.ObserveFloat64(m.nodeCPU, sample.CPUPercent)
		o.ObserveFloat64(m.nodeMemory, sample.MemoryPercent)
		o.ObserveInt64(m.nodeMemUsed, clampInt64(sample.MemoryUsedBytes))
		o.ObserveInt64(m.nodeMemTotal, clampInt64(sample.MemoryTotalBytes))
		return nil
	}, m.nodeCPU, m.nodeMemory, m.nodeMemUsed, m.nodeMemTotal)
	if err != nil {
		return fmt.Errorf("register node gauges: %w", err)
	}

	m.mu.Lock()
	previous := m.nodeCallback
	m.nodeCallback = reg
	m.mu.Unlock()
	if previous != nil {
		if err := previous.Unregister(); err != nil {
			return fmt.Errorf("unregister previous node reader: %w", err)
		}
	}
	return nil
}

// clampInt64 converts a byte count to the int64 the gauge takes.
func clampInt64(v uint64) int64 {
	if v > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(v)
}

// Isolation publishes, once at start, how executions are contained on this
// node: flux_sandbox_isolation{cgroup="v2|v1|none", user="flux-runner",
// degraded="true|false", favordynmods="true|false"} 1. An operator alerts
// on degraded="true": the agent then runs functions without some of the
// sandbox (not root, no flux-runner user, no writable cgroup); the start-up
// log says which part. favordynmods says whether the host made cgroup
// moves cheap (a tuning, see the README), which only the making of new
// slots in a burst feels.
func (m *Metrics) Isolation(ctx context.Context, cgroup, user string, degraded, favorDynMods bool) error {
	g, err := m.meter.Int64Gauge("flux.sandbox.isolation",
		metric.WithDescription("How executions are isolated on this node (always 1; read the labels)."))
	if err != nil {
		return fmt.Errorf("register isolation gauge: %w", err)
	}
	g.Record(ctx, 1, metric.WithAttributes(
		attribute.String("cgroup", cgroup), attribute.String("user", user), attribute.Bool("degraded", degraded),
		attribute.Bool("favordynmods", favorDynMods)))
	return nil
}

// observeSpanQueue publishes the span export queue's state at each
// collection: flux_telemetry_spans_dropped_total{reason="queue_full" or
// "export_failed"} and flux_telemetry_span_queue_used_bytes.
func (m *Metrics) observeSpanQueue(q *spanQueue) error {
	dropped, err := m.meter.Int64ObservableCounter("flux.telemetry.spans.dropped", metric.WithUnit("{span}"),
		metric.WithDescription("Spans dropped before export: the export queue was full, or their export failed."))
	if err != nil {
		return fmt.Errorf("register dropped-spans counter: %w", err)
	}
	used, err := m.meter.Int64ObservableGauge("flux.telemetry.span_queue.used", metric.WithUnit("By"),
		metric.WithDescription("Memory held by spans waiting for export or being exported."))
	if err != nil {
		return fmt.Errorf("register span queue gauge: %w", err)
	}
	_, err = m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for _, reason := range []string{dropQueueFull, dropExportFailed} {
			o.ObserveInt64(dropped, q.dropped(reason), metric.WithAttributes(labelReason.String(reason)))
		}
		o.ObserveInt64(used, q.heldGauge.Load())
		return nil
	}, dropped, used)
	if err != nil {
		return fmt.Errorf("register span queue metrics: %w", err)
	}
	return nil
}
