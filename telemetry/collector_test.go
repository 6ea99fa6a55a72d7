package telemetry

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"

	collectormetrics "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// fakeCollector is a loopback OTLP receiver that remembers what it was sent,
// flattened to strings so tests can compare with cmp.Diff.
type fakeCollector struct {
	collectortrace.UnimplementedTraceServiceServer

	mu      sync.Mutex
	spans   []receivedSpan
	metrics []string
	paths   []string
}

// receivedSpan is one exported span with its resource.
type receivedSpan struct {
	Resource   map[string]string
	Name       string
	Attributes map[string]string
}

func (c *fakeCollector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.addTraces(req)
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// metricsService adapts the collector to the metrics gRPC service, whose
// Export method has the same name as the trace service's.
type metricsService struct {
	collectormetrics.UnimplementedMetricsServiceServer
	c *fakeCollector
}

func (s metricsService) Export(_ context.Context, req *collectormetrics.ExportMetricsServiceRequest) (*collectormetrics.ExportMetricsServiceResponse, error) {
	s.c.addMetrics(req)
	return &collectormetrics.ExportMetricsServiceResponse{}, nil
}

func (c *fakeCollector) addTraces(req *collectortrace.ExportTraceServiceRequest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		res := flatten(rs.GetResource().GetAttributes())
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				c.spans = append(c.spans, receivedSpan{Resource: res, Name: s.GetName(), Attributes: flatten(s.GetAttributes())})
			}
		}
	}
}

func (c *fakeCollector) addMetrics(req *collectormetrics.ExportMetricsServiceRequest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rm := range req.GetResourceMetrics() {
		for _, sm := range rm.GetScopeMetrics() {
			for _, m := range sm.GetMetrics() {
				c.metrics = append(c.metrics, m.GetName())
			}
		}
	}
}

func (c *fakeCollector) received() ([]receivedSpan, []string, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]receivedSpan(nil), c.spans...), append([]string(nil), c.metrics...), append([]string(nil), c.paths...)
}

// flatten turns OTLP attributes into strings; only the kinds the agent emits.
func flatten(attrs []*commonpb.KeyValue) map[string]string {
	out := make(map[string]string, len(attrs))
	for _, kv := range attrs {
		v := kv.GetValue()
		switch v.GetValue().(type) {
		case *commonpb.AnyValue_StringValue:
			out[kv.GetKey()] = v.GetStringValue()
		case *commonpb.AnyValue_IntValue:
			out[kv.GetKey()] = strconv.FormatInt(v.GetIntValue(), 10)
		case *commonpb.AnyValue_BoolValue:
			out[kv.GetKey()] = strconv.FormatBool(v.GetBoolValue())
		case *commonpb.AnyValue_DoubleValue:
			out[kv.GetKey()] = strconv.FormatFloat(v.GetDoubleValue(), 'g', -1, 64)
		default:
			out[kv.GetKey()] = v.String()
		}
	}
	return out
}

// startGRPCCollector serves OTLP/gRPC on a loopback port until the test ends.
func startGRPCCollector(t *testing.T) (string, *fakeCollector) {
	t.Helper()
	c := &fakeCollector{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, c)
	collectormetrics.RegisterMetricsServiceServer(srv, metricsService{c: c})
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-served
	})
	return lis.Addr().String(), c
}

// startHTTPCollector serves OTLP/HTTP (protobuf) on a loopback port until
// the test ends; it records the paths it was sent to.
func startHTTPCollector(t *testing.T) (string, *fakeCollector) {
	t.Helper()
	c := &fakeCollector{}
	handle := func(w http.ResponseWriter, r *http.Request, req, resp proto.Message, add func()) {
		body, err := io.ReadAll(r.Body)
		if err == nil {
			err = proto.Unmarshal(body, req)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		c.paths = append(c.paths, r.URL.Path)
		c.mu.Unlock()
		add()
		out, _ := proto.Marshal(resp)
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /base/v1/traces", func(w http.ResponseWriter, r *http.Request) {
		req := &collectortrace.ExportTraceServiceRequest{}
		handle(w, r, req, &collectortrace.ExportTraceServiceResponse{}, func() { c.addTraces(req) })
	})
	mux.HandleFunc("POST /base/v1/metrics", func(w http.ResponseWriter, r *http.Request) {
		req := &collectormetrics.ExportMetricsServiceRequest{}
		handle(w, r, req, &collectormetrics.ExportMetricsServiceResponse{}, func() { c.addMetrics(req) })
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL, c
}
