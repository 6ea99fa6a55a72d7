package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"slices"
	"strings"

	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// OTLP protocols the agent can export with (the values of
// OTEL_EXPORTER_OTLP_PROTOCOL that both the trace and metric exporters of the
// Go SDK support).
const (
	ProtocolGRPC         = "grpc"
	ProtocolHTTPProtobuf = "http/protobuf"
)

// Errors Setup returns for telemetry settings it cannot honour.
var (
	ErrUnsupportedProtocol = errors.New("unsupported OTLP protocol")
	ErrBadEndpoint         = errors.New("bad OTLP endpoint")
	ErrUnsupportedExporter = errors.New("unsupported exporter")
)

// Environment variables the agent reads itself; everything else OTEL_* is
// read by the SDK and the exporters (see README.md).
const (
	envEndpoint        = "OTEL_EXPORTER_OTLP_ENDPOINT"
	envProtocol        = "OTEL_EXPORTER_OTLP_PROTOCOL"
	envTracesExporter  = "OTEL_TRACES_EXPORTER"
	envMetricsExporter = "OTEL_METRICS_EXPORTER"
)

// signal is one kind of OTLP data, with the names its per-signal settings use.
type signal struct {
	envName  string // TRACES or METRICS, as in OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
	httpPath string // path appended to a base endpoint URL for OTLP/HTTP
}

var (
	tracesSignal  = signal{envName: "TRACES", httpPath: "v1/traces"}
	metricsSignal = signal{envName: "METRICS", httpPath: "v1/metrics"}
)

// otlpTarget is where one signal is exported, resolved from Config and the
// environment. An empty endpoint leaves it to the exporter's own reading of
// OTEL_EXPORTER_OTLP_*ENDPOINT.
type otlpTarget struct {
	protocol string
	endpoint string // host:port from Config.OTLPEndpoint
	urlPath  string // OTLP/HTTP path when endpoint is set
	insecure bool
}

// describe says where the target sends, for the start-up log line.
func (t otlpTarget) describe(sig signal) string {
	if t.endpoint == "" {
		return "endpoint from OTEL_EXPORTER_OTLP_" + sig.envName + "_ENDPOINT or " + envEndpoint
	}
	if t.protocol == ProtocolHTTPProtobuf {
		return t.endpoint + t.urlPath
	}
	return t.endpoint
}

// lookupEnv treats an empty variable as unset, as the SDK does.
func lookupEnv(name string) (string, bool) {
	v, ok := os.LookupEnv(name)
	return v, ok && strings.TrimSpace(v) != ""
}

// resolveTarget decides whether sig is exported by OTLP and where to. It
// reports false when neither the config nor the environment names an
// endpoint: then nothing is exported.
func resolveTarget(cfg Config, sig signal) (otlpTarget, bool, error) {
	_, generic := lookupEnv(envEndpoint)
	_, specific := lookupEnv("OTEL_EXPORTER_OTLP_" + sig.envName + "_ENDPOINT")
	if cfg.OTLPEndpoint == "" && !generic && !specific {
		return otlpTarget{}, false, nil
	}

	target := otlpTarget{protocol: cfg.OTLPProtocol, insecure: cfg.OTLPInsecure}
	if target.protocol == "" {
		target.protocol = firstEnv("OTEL_EXPORTER_OTLP_"+sig.envName+"_PROTOCOL", envProtocol)
	}
	if target.protocol == "" {
		target.protocol = ProtocolGRPC
	}
	if target.protocol != ProtocolGRPC && target.protocol != ProtocolHTTPProtobuf {
		return otlpTarget{}, false, fmt.Errorf("%w %q: use %q or %q",
			ErrUnsupportedProtocol, target.protocol, ProtocolGRPC, ProtocolHTTPProtobuf)
	}

	if cfg.OTLPEndpoint != "" {
		hostPort, basePath, plainText, err := parseEndpoint(cfg.OTLPEndpoint)
		if err != nil {
			return otlpTarget{}, false, err
		}
		target.endpoint = hostPort
		target.urlPath = path.Join("/", basePath, sig.httpPath)
		target.insecure = target.insecure || plainText
	}
	return target, true, nil
}

// firstEnv returns the value of the first of names that is set.
func firstEnv(names ...string) string {
	for _, name := range names {
		if v, ok := lookupEnv(name); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// parseEndpoint reads an endpoint written like OTEL_EXPORTER_OTLP_ENDPOINT
// ("http://host:4317", "https://host/base") or as a bare "host:port". It
// reports plainText for an http:// URL.
func parseEndpoint(endpoint string) (hostPort, basePath string, plainText bool, err error) {
	if !strings.Contains(endpoint, "://") {
		if _, _, err := net.SplitHostPort(endpoint); err != nil {
			return "", "", false, fmt.Errorf("%w %q: want host:port or an http(s) URL: %w", ErrBadEndpoint, endpoint, err)
		}
		return endpoint, "", false, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", "", false, fmt.Errorf("%w %q: %w", ErrBadEndpoint, endpoint, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", "", false, fmt.Errorf("%w %q: scheme must be http or https", ErrBadEndpoint, endpoint)
	}
	if u.Host == "" {
		return "", "", false, fmt.Errorf("%w %q: no host", ErrBadEndpoint, endpoint)
	}
	return u.Host, u.Path, u.Scheme == "http", nil
}

// exporterChoice reads OTEL_TRACES_EXPORTER or OTEL_METRICS_EXPORTER: a
// comma-separated list of exporter names. It returns the names, checked
// against allowed.
func exporterChoice(name string, allowed ...string) ([]string, error) {
	v, ok := lookupEnv(name)
	if !ok {
		return nil, nil
	}
	var names []string
	for _, n := range strings.Split(v, ",") {
		n = strings.TrimSpace(n)
		if !slices.Contains(allowed, n) {
			return nil, fmt.Errorf("%w %q in %s: use one of %s", ErrUnsupportedExporter, n, name, strings.Join(allowed, ", "))
		}
		names = append(names, n)
	}
	return names, nil
}

// newSpanExporter builds the OTLP span exporter for target. Neither builder
// connects: the gRPC client dials lazily and the HTTP client per request, so
// an unreachable collector cannot fail or delay start-up.
func newSpanExporter(ctx context.Context, target otlpTarget) (sdktrace.SpanExporter, error) {
	switch target.protocol {
	case ProtocolHTTPProtobuf:
		opts := []otlptracehttp.Option{otlptracehttp.WithEncoding(otlptracehttp.EncodingProtobuf)}
		if target.endpoint != "" {
			opts = append(opts, otlptracehttp.WithEndpoint(target.endpoint), otlptracehttp.WithURLPath(target.urlPath))
		}
		if target.insecure {
			opts = append(opts, otlptracehttp.WithInsecure())
		}
		return otlptracehttp.New(ctx, opts...)
	default:
		var opts []otlptracegrpc.Option
		if target.endpoint != "" {
			opts = append(opts, otlptracegrpc.WithEndpoint(target.endpoint))
		}
		if target.insecure {
			opts = append(opts, otlptracegrpc.WithInsecure())
		}
		return otlptracegrpc.New(ctx, opts...)
	}
}

// newMetricExporter builds the OTLP metric exporter for target.
func newMetricExporter(ctx context.Context, target otlpTarget) (sdkmetric.Exporter, error) {
	switch target.protocol {
	case ProtocolHTTPProtobuf:
		var opts []otlpmetrichttp.Option
		if target.endpoint != "" {
			opts = append(opts, otlpmetrichttp.WithEndpoint(target.endpoint), otlpmetrichttp.WithURLPath(target.urlPath))
		}
		if target.insecure {
			opts = append(opts, otlpmetrichttp.WithInsecure())
		}
		return otlpmetrichttp.New(ctx, opts...)
	default:
		var opts []otlpmetricgrpc.Option
		if target.endpoint != "" {
			opts = append(opts, otlpmetricgrpc.WithEndpoint(target.endpoint))
		}
		if target.insecure {
			opts = append(opts, otlpmetricgrpc.WithInsecure())
		}
		return otlpmetricgrpc.New(ctx, opts...)
	}
}
