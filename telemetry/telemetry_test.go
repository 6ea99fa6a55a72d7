package telemetry

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// otelEnv lists the variables that would steer Setup; tests clear them so
// the machine's environment cannot change their outcome.
var otelEnv = []string{
	"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
	"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
	"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME",
	"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
}

func clearOTelEnv(t *testing.T) {
	t.Helper()
	for _, name := range otelEnv {
		t.Setenv(name, "")
	}
}

// shutdownCtx bounds a Shutdown the way main does.
func shutdownCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestSetupWithNothingConfiguredExportsNothingButRecords(t *testing.T) {
	clearOTelEnv(t)
	tel, err := Setup(context.Background(), Config{AgentID: "agent-1", MetricsPush: true})
	if err != nil {
		t.Fatal(err)
	}
	if tel.tracesExported || tel.metricsPushed {
		t.Errorf("exporting with nothing configured: traces %v, metrics %v", tel.tracesExported, tel.metricsPushed)
	}

	_, span := tel.TracerProvider.Tracer(ScopeName).Start(context.Background(), SpanExecution)
	if !span.SpanContext().IsValid() || !span.IsRecording() {
		t.Errorf("span without exporter: valid %v, recording %v; want both so logs carry trace ids",
			span.SpanContext().IsValid(), span.IsRecording())
	}
	span.End()
	if err := tel.Shutdown(shutdownCtx(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestExportsSpansWithResource(t *testing.T) {
	tests := []struct {
		name     string
		protocol string
		start    func(*testing.T) (string, *fakeCollector)
		endpoint func(addr string) string
		wantPath []string
	}{
		{
			name:     "grpc host:port",
			protocol: ProtocolGRPC,
			start:    startGRPCCollector,
			endpoint: func(addr string) string { return addr },
		},
		{
			name:     "grpc http URL",
			protocol: "",
			start:    startGRPCCollector,
			endpoint: func(addr string) string { return "http://" + addr },
		},
		{
			name:     "http/protobuf base URL",
			protocol: ProtocolHTTPProtobuf,
			start:    startHTTPCollector,
			endpoint: func(url string) string { return url + "/base" },
			wantPath: []string{"/base/v1/traces"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearOTelEnv(t)
			addr, collector := tt.start(t)
			tel, err := Setup(context.Background(), Config{
				ServiceVersion: "1.2.3", AgentID: "agent-7", HostName: "node-a",
				OTLPEndpoint: tt.endpoint(addr), OTLPProtocol: tt.protocol, OTLPInsecure: true,
			})
			if err != nil {
				t.Fatal(err)
			}
			_, span := tel.TracerProvider.Tracer(ScopeName).Start(context.Background(), SpanExecution)
			span.SetAttributes(AttrFunction.String("hello"), AttrExecutionID.String("e-1"), AttrAsync.Bool(true))
			span.End()
			if err := tel.Shutdown(shutdownCtx(t)); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}

			spans, _, paths := collector.received()
			if len(spans) != 1 {
				t.Fatalf("collector got %d spans, want 1", len(spans))
			}
			got := spans[0]
			for _, key := range []string{"telemetry.sdk.language", "telemetry.sdk.name", "telemetry.sdk.version"} {
				delete(got.Resource, key)
			}
			want := receivedSpan{
				Resource: map[string]string{
					"service.name": "flux-agent", "service.version": "1.2.3", "service.instance.id": "agent-7",
					"flux.agent.id": "agent-7", "host.name": "node-a",
				},
				Name:       SpanExecution,
				Attributes: map[string]string{"flux.function.name": "hello", "flux.execution.id": "e-1", "flux.execution.async": "true"},
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("exported span (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantPath, paths); diff != "" {
				t.Errorf("OTLP/HTTP paths (-want +got):\n%s", diff)
			}
		})
	}
}

func TestEnvironmentConfiguresExport(t *testing.T) {
	clearOTelEnv(t)
	addr, collector := startGRPCCollector(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+addr)
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
	t.Setenv("OTEL_METRICS_EXPORTER", "otlp")

	tel, err := Setup(context.Background(), Config{AgentID: "agent-env"})
	if err != nil {
		t.Fatal(err)
	}
	_, span := tel.TracerProvider.Tracer(ScopeName).Start(context.Background(), SpanDeploy)
	span.End()
	tel.Metrics.Deployed(context.Background(), "hello", 2048, nil)
	if err := tel.Shutdown(shutdownCtx(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}

	spans, metrics, _ := collector.received()
	if len(spans) != 1 || spans[0].Name != SpanDeploy {
		t.Fatalf("collector got spans %+v, want one %s", spans, SpanDeploy)
	}
	if got := spans[0].Resource["deployment.environment.name"]; got != "test" {
		t.Errorf("OTEL_RESOURCE_ATTRIBUTES not applied: deployment.environment.name = %q", got)
	}
	if !containsString(metrics, "flux.deploys") {
		t.Errorf("pushed metrics %v lack flux.deploys", metrics)
	}
}

func TestMetricsPushOverHTTP(t *testing.T) {
	clearOTelEnv(t)
	url, collector := startHTTPCollector(t)
	tel, err := Setup(context.Background(), Config{
		OTLPEndpoint: url + "/base", OTLPProtocol: ProtocolHTTPProtobuf, MetricsPush: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	tel.Metrics.ExecutionStarted(context.Background(), "hello", false)
	if err := tel.Shutdown(shutdownCtx(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	_, metrics, paths := collector.received()
	if !containsString(metrics, "flux.executions.started") {
		t.Errorf("pushed metrics %v lack flux.executions.started", metrics)
	}
	if !containsString(paths, "/base/v1/metrics") {
		t.Errorf("OTLP/HTTP paths %v lack /base/v1/metrics", paths)
	}
}

// TestUnreachableCollectorNeverBlocks ends more spans than the export queue
// holds with the collector's port closed: ending must drop, not wait, and
// Shutdown must give up when its context ends.
func TestUnreachableCollectorNeverBlocks(t *testing.T) {
	for _, protocol := range []string{ProtocolGRPC, ProtocolHTTPProtobuf} {
		t.Run(protocol, func(t *testing.T) {
			clearOTelEnv(t)
			tel, err := Setup(context.Background(), Config{
				OTLPEndpoint: "http://" + closedPort(t), OTLPProtocol: protocol, MetricsPush: true,
			})
			if err != nil {
				t.Fatal(err)
			}
			const spans = 10_000 // five times the default queue
			ended := make(chan struct{})
			go func() {
				defer close(ended)
				tracer := tel.TracerProvider.Tracer(ScopeName)
				for range spans {
					_, span := tracer.Start(context.Background(), SpanExecution)
					span.End()
				}
			}()
			select {
			case <-ended:
			case <-time.After(30 * time.Second):
				t.Fatal("ending spans blocked on an unreachable collector")
			}

			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			shutdown := make(chan error, 1)
			go func() { shutdown <- tel.Shutdown(ctx) }()
			select {
			case err := <-shutdown:
				t.Logf("Shutdown with the collector unreachable: %v", err)
			case <-time.After(30 * time.Second):
				t.Fatal("Shutdown did not return after its context ended")
			}
		})
	}
}

func TestSetupRejectsBadSettings(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		env  map[string]string
		want error
	}{
		{name: "json protocol", cfg: Config{OTLPEndpoint: "127.0.0.1:4318", OTLPProtocol: "http/json"}, want: ErrUnsupportedProtocol},
		{name: "protocol from env", cfg: Config{OTLPEndpoint: "127.0.0.1:4317"}, env: map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, want: ErrUnsupportedProtocol},
		{name: "scheme", cfg: Config{OTLPEndpoint: "ftp://collector:21"}, want: ErrBadEndpoint},
		{name: "no port", cfg: Config{OTLPEndpoint: "collector"}, want: ErrBadEndpoint},
		{name: "no host", cfg: Config{OTLPEndpoint: "http://"}, want: ErrBadEndpoint},
		{name: "console traces exporter", env: map[string]string{"OTEL_TRACES_EXPORTER": "console"}, want: ErrUnsupportedExporter},
		{name: "zipkin metrics exporter", env: map[string]string{"OTEL_METRICS_EXPORTER": "otlp,zipkin"}, want: ErrUnsupportedExporter},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearOTelEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			tel, err := Setup(context.Background(), tt.cfg)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Setup error = %v, want %v", err, tt.want)
			}
			if tel != nil {
				t.Errorf("Setup returned a Telemetry with its error")
			}
		})
	}
}

func TestResolveTarget(t *testing.T) {
	tests := []struct {
		name       string
		cfg        Config
		env        map[string]string
		want       otlpTarget
		configured bool
	}{
		{name: "nothing", configured: false},
		{name: "generic env", env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
			want: otlpTarget{protocol: ProtocolGRPC}, configured: true},
		{name: "signal env and its protocol", env: map[string]string{
			"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
			"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
			want: otlpTarget{protocol: ProtocolHTTPProtobuf}, configured: true},
		{name: "config host:port", cfg: Config{OTLPEndpoint: "c:4317"},
			want: otlpTarget{protocol: ProtocolGRPC, endpoint: "c:4317", urlPath: "/v1/traces"}, configured: true},
		{name: "config insecure", cfg: Config{OTLPEndpoint: "c:4317", OTLPInsecure: true},
			want: otlpTarget{protocol: ProtocolGRPC, endpoint: "c:4317", urlPath: "/v1/traces", insecure: true}, configured: true},
		{name: "config http URL with base path over env", cfg: Config{OTLPEndpoint: "http://c:4318/otlp/", OTLPProtocol: ProtocolHTTPProtobuf},
			env:  map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "https://elsewhere:4318"},
			want: otlpTarget{protocol: ProtocolHTTPProtobuf, endpoint: "c:4318", urlPath: "/otlp/v1/traces", insecure: true}, configured: true},
		{name: "config https URL", cfg: Config{OTLPEndpoint: "https://c"},
			want: otlpTarget{protocol: ProtocolGRPC, endpoint: "c", urlPath: "/v1/traces"}, configured: true},
		{name: "protocol from env", cfg: Config{OTLPEndpoint: "c:4318"}, env: map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
			want: otlpTarget{protocol: ProtocolHTTPProtobuf, endpoint: "c:4318", urlPath: "/v1/traces"}, configured: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearOTelEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			got, configured, err := resolveTarget(tt.cfg, tracesSignal)
			if err != nil {
				t.Fatal(err)
			}
			if configured != tt.configured {
				t.Errorf("configured = %v, want %v", configured, tt.configured)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(otlpTarget{})); diff != "" {
				t.Errorf("target (-want +got):\n%s", diff)
			}
		})
	}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	if err := lis.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// BenchmarkSpanWithUnreachableCollector measures starting and ending a span
// with attributes while every export fails: the cost an execution pays.
func BenchmarkSpanWithUnreachableCollector(b *testing.B) {
	for _, name := range otelEnv {
		b.Setenv(name, "")
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	tel, err := Setup(context.Background(), Config{OTLPEndpoint: "http://" + addr})
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		tel.Shutdown(ctx)
	}()
	tracer := tel.TracerProvider.Tracer(ScopeName)
	b.ReportAllocs()
	for b.Loop() {
		_, span := tracer.Start(context.Background(), SpanExecution)
		span.SetAttributes(AttrFunction.String("hello"), AttrExecutionID.String("exc-1"), AttrAsync.Bool(true))
		span.End()
	}
}
