// Package telemetry sets up the agent's traces, metrics and logs: OTLP export
// of spans and (optionally) metrics, a Prometheus /metrics endpoint with
// /healthz and /readyz, the agent's metric instruments, and an slog logger
// that stamps each line with the trace it belongs to. An unreachable or slow
// collector never blocks or fails the work being observed: spans wait in a
// queue bounded in bytes that drops when full, and exports run in the
// background with timeouts. What a span may hold is bounded too (see
// limits.go), and the Redis instrumentation (InstrumentRedis) records
// commands and keys, never values.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelprometheus "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// DefaultCardinalityLimit caps the label sets one instrument keeps; beyond it
// the SDK folds new sets into one overflow series instead of growing memory.
// Labels are function names and statuses, so a fleet's real use stays far
// below it.
const DefaultCardinalityLimit = 2000

// Config says how the agent's telemetry is identified and exported. Settings
// left empty fall back to the standard OTEL_* environment variables.
type Config struct {
	// ServiceVersion, AgentID and HostName describe the agent in the resource
	// every span and metric carries. An empty HostName is read from the OS.
	ServiceVersion string
	AgentID        string
	HostName       string

	// OTLPEndpoint is where spans (and pushed metrics) go: "host:port" or a
	// URL like OTEL_EXPORTER_OTLP_ENDPOINT ("http://collector:4318"; for
	// OTLP/HTTP, /v1/traces and /v1/metrics are appended to its path). Empty
	// means OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
	// when none is set nothing is exported, though spans are still recorded
	// so logs carry trace ids.
	OTLPEndpoint string
	// OTLPProtocol is ProtocolGRPC or ProtocolHTTPProtobuf; empty means
	// OTEL_EXPORTER_OTLP_PROTOCOL, or gRPC.
	OTLPProtocol string
	// OTLPInsecure sends without TLS (an http:// endpoint implies it).
	OTLPInsecure bool
	// MetricsPush also pushes metrics by OTLP to the same endpoint
	// (OTEL_METRICS_EXPORTER=otlp does too); /metrics is served either way.
	MetricsPush bool
	// ExportQueueBytes is the memory ended spans may take while they wait
	// for export; beyond it they are dropped. 0 means
	// DefaultExportQueueBytes.
	ExportQueueBytes int64

	// Logger receives telemetry's own messages, including export failures
	// once SetGlobal has run. Nil discards them.
	Logger *slog.Logger
}

// Telemetry holds the providers the agent instruments itself with. Pass the
// providers to otelgrpc and InstrumentRedis, create spans from
// TracerProvider.Tracer(ScopeName), and call Shutdown before exit so queued
// spans and metrics are flushed.
type Telemetry struct {
	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
	// Propagator reads and writes W3C traceparent/tracestate and baggage.
	Propagator propagation.TextMapPropagator
	Metrics    *Metrics
	// PrometheusHandler serves every instrument in the Prometheus text format,
	// plus the Go runtime and process collectors, from a private registry.
	PrometheusHandler http.Handler

	serviceVersion string
	logger         *slog.Logger
	tracerProvider *sdktrace.TracerProvider
	spanQueue      *spanQueue
	meterProvider  *sdkmetric.MeterProvider
	tracesExported bool
	metricsPushed  bool

	shutdownOnce sync.Once
	shutdownErr  error
}

// Setup builds the trace and meter providers from cfg and the environment.
// It connects to nothing: exporters dial lazily, so a collector that is down
// at start-up costs nothing. On error nothing is left running.
func Setup(ctx context.Context, cfg Config) (tel *Telemetry, err error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	tel = &Telemetry{
		Propagator:     propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}),
		serviceVersion: cfg.ServiceVersion,
		logger:         logger,
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, tel.Shutdown(context.WithoutCancel(ctx)))
			tel = nil
		}
	}()

	res, err := newResource(ctx, cfg)
	if err != nil {
		return tel, err
	}
	if err := tel.setupTraces(ctx, cfg, res); err != nil {
		return tel, err
	}
	if err := tel.setupMetrics(ctx, cfg, res); err != nil {
		return tel, err
	}
	return tel, nil
}

// newResource describes the agent. OTEL_RESOURCE_ATTRIBUTES and
// OTEL_SERVICE_NAME are applied last, so an operator can override any of it.
func newResource(ctx context.Context, cfg Config) (*resource.Resource, error) {
	attrs := []resource.Option{resource.WithTelemetrySDK()}
	agent := []attributeValue{
		{semconv.ServiceNameKey, ServiceName},
		{semconv.ServiceVersionKey, cfg.ServiceVersion},
		{semconv.ServiceInstanceIDKey, cfg.AgentID},
		{AttrAgentID, cfg.AgentID},
		{semconv.HostNameKey, cfg.HostName},
	}
	for _, a := range agent {
		if a.value != "" {
			attrs = append(attrs, resource.WithAttributes(a.key.String(a.value)))
		}
	}
	if cfg.HostName == "" {
		attrs = append(attrs, resource.WithHost())
	}
	attrs = append(attrs, resource.WithFromEnv())
	res, err := resource.New(ctx, attrs...)
	if err != nil {
		return nil, fmt.Errorf("telemetry resource (check OTEL_RESOURCE_ATTRIBUTES): %w", err)
	}
	return res, nil
}

// attributeValue is one resource attribute that is set only when non-empty.
type attributeValue struct {
	key   attribute.Key
	value string
}

// setupTraces builds the tracer provider. The sampler is left to the SDK so
// OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG apply (default: parent
// based, always on). Span limits come from OTEL_SPAN_*_LIMIT held to the
// caps in limits.go, and exported spans go through a spanQueue bounded by
// cfg.ExportQueueBytes and the OTEL_BSP_* settings, which drops rather than
// blocks when full.
func (t *Telemetry) setupTraces(ctx context.Context, cfg Config, res *resource.Resource) error {
	limits := spanLimits()
	opts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res), sdktrace.WithRawSpanLimits(limits)}

	exporters, err := exporterChoice(envTracesExporter, "otlp", "none")
	if err != nil {
		return err
	}
	target, configured, err := resolveTarget(cfg, tracesSignal)
	if err != nil {
		return fmt.Errorf("trace export: %w", err)
	}
	if configured && !slices.Contains(exporters, "none") {
		exporter, err := newSpanExporter(ctx, target)
		if err != nil {
			return fmt.Errorf("trace exporter: %w", err)
		}
		queueOpts := queueOptionsFromEnv(cfg.ExportQueueBytes, limits.AttributeValueLengthLimit)
		t.spanQueue = newSpanQueue(exporter, queueOpts, t.logger)
		opts = append(opts, sdktrace.WithSpanProcessor(t.spanQueue))
		t.tracesExported = true
		t.logger.Info("telemetry: exporting traces by OTLP",
			"protocol", target.protocol, "endpoint", target.describe(tracesSignal),
			"queue_bytes", queueOpts.budgetBytes, "queue_spans", queueOpts.maxSpans)
	} else {
		t.logger.Info("telemetry: no OTLP endpoint configured, traces are not exported")
	}

	t.tracerProvider = sdktrace.NewTracerProvider(opts...)
	t.TracerProvider = t.tracerProvider
	return nil
}

// setupMetrics builds the meter provider with the Prometheus reader always
// and an OTLP periodic reader (OTEL_METRIC_EXPORT_INTERVAL, default 60s) when
// pushing is asked for and an endpoint is known.
func (t *Telemetry) setupMetrics(ctx context.Context, cfg Config, res *resource.Resource) error {
	registry := prometheus.NewRegistry()
	if err := registry.Register(collectors.NewGoCollector()); err != nil {
		return fmt.Errorf("register Go collector: %w", err)
	}
	if err := registry.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return fmt.Errorf("register process collector: %w", err)
	}
	promReader, err := otelprometheus.New(otelprometheus.WithRegisterer(registry), otelprometheus.WithoutScopeInfo())
	if err != nil {
		return fmt.Errorf("prometheus exporter: %w", err)
	}
	t.PrometheusHandler = promhttp.HandlerFor(registry, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})

	opts := []sdkmetric.Option{
		sdkmetric.WithResource(res),
		sdkmetric.WithReader(promReader),
		sdkmetric.WithCardinalityLimit(DefaultCardinalityLimit),
	}

	exporters, err := exporterChoice(envMetricsExporter, "otlp", "prometheus", "none")
	if err != nil {
		return err
	}
	push := (cfg.MetricsPush || slices.Contains(exporters, "otlp")) && !slices.Contains(exporters, "none")
	if push {
		target, configured, err := resolveTarget(cfg, metricsSignal)
		if err != nil {
			return fmt.Errorf("metric export: %w", err)
		}
		if configured {
			exporter, err := newMetricExporter(ctx, target)
			if err != nil {
				return fmt.Errorf("metric exporter: %w", err)
			}
			opts = append(opts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exporter)))
			t.metricsPushed = true
			t.logger.Info("telemetry: pushing metrics by OTLP",
				"protocol", target.protocol, "endpoint", target.describe(metricsSignal))
		} else {
			t.logger.Warn("telemetry: metrics push asked for but no OTLP endpoint configured")
		}
	}

	t.meterProvider = sdkmetric.NewMeterProvider(opts...)
	t.MeterProvider = t.meterProvider
	t.Metrics, err = NewMetrics(t.meterProvider, t.serviceVersion)
	if err != nil {
		return err
	}
	if t.spanQueue != nil {
		return t.Metrics.observeSpanQueue(t.spanQueue)
	}
	return nil
}

// SetGlobal installs the providers and propagator as OpenTelemetry's globals,
// for libraries that take no provider, and routes the SDK's own errors
// (failed exports, dropped spans) to the logger at warn level instead of
// stderr. Call it once from main.
func (t *Telemetry) SetGlobal() {
	otel.SetTracerProvider(t.TracerProvider)
	otel.SetMeterProvider(t.MeterProvider)
	otel.SetTextMapPropagator(t.Propagator)
	logger := t.logger
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		logger.Warn("telemetry: export failed", "err", err)
	}))
}

// Shutdown flushes queued spans and metrics and stops the exporters. It
// returns when done or when ctx ends, so give it a deadline: with the
// collector unreachable, the flush waits for the export timeout. Errors are
// joined; calling it again returns the first result.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	t.shutdownOnce.Do(func() {
		var errs []error
		if t.tracerProvider != nil {
			if err := t.tracerProvider.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("trace provider shutdown: %w", err))
			}
		}
		if t.spanQueue != nil {
			// A no-op after the provider's shutdown reached it; not when ctx
			// had ended before (the provider then skips its processors) or
			// Setup failed before the provider was built. The queue flushes
			// until ctx ends, then abandons the export in flight, so this
			// returns in time with a collector down.
			if err := t.spanQueue.Shutdown(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		if t.meterProvider != nil {
			if err := t.meterProvider.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("meter provider shutdown: %w", err))
			}
		}
		t.shutdownErr = errors.Join(errs...)
	})
	return t.shutdownErr
}
