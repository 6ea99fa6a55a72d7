package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Jaeger for the telemetry tests: github.com/jaegertracing/jaeger/cmd/jaeger
// as pinned in tools/go.mod (v1.76.0, the OpenTelemetry-Collector-based
// Jaeger v2 binary), run on loopback with in-memory storage.
const jaegerPackage = "github.com/jaegertracing/jaeger/cmd/jaeger"

// jaegerBinaryEnv names a prebuilt Jaeger to use instead of building one
// (CI can build it in a step of its own).
const jaegerBinaryEnv = "FLUX_E2E_JAEGER"

var jaegerBuild struct {
	once sync.Once
	path string
	err  error
}

// jaegerBinary returns a Jaeger built from the tools module, building it at
// most once per tools/go.sum: the binary is kept in the user cache directory
// under a name derived from go.sum, so a cold build (several minutes) is paid
// once per pin and later runs start at once.
func jaegerBinary(t testing.TB) string {
	t.Helper()
	jaegerBuild.once.Do(func() {
		if path := os.Getenv(jaegerBinaryEnv); path != "" {
			jaegerBuild.path = path
			return
		}
		jaegerBuild.path, jaegerBuild.err = buildJaeger()
	})
	if jaegerBuild.err != nil {
		t.Fatalf("build Jaeger: %v", jaegerBuild.err)
	}
	return jaegerBuild.path
}

func buildJaeger() (string, error) {
	toolsDir, err := filepath.Abs(filepath.Join("..", "tools"))
	if err != nil {
		return "", err
	}
	sum, err := os.ReadFile(filepath.Join(toolsDir, "go.sum"))
	if err != nil {
		return "", err
	}
	digest := sha256.Sum256(sum)
	cacheDir, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cacheDir, "flux-agent-e2e")
	path := filepath.Join(dir, "jaeger-"+hex.EncodeToString(digest[:8]))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Build beside the final name and rename, so an interrupted build never
	// leaves a binary that looks complete.
	partial := fmt.Sprintf("%s.partial-%d", path, os.Getpid())
	build := exec.Command("go", "-C", toolsDir, "build", "-o", partial, jaegerPackage)
	var out bytes.Buffer
	build.Stdout, build.Stderr = &out, &out
	if err := build.Run(); err != nil {
		os.Remove(partial)
		return "", fmt.Errorf("go build %s: %w\n%s", jaegerPackage, err, out.String())
	}
	if err := os.Rename(partial, path); err != nil {
		return "", err
	}
	return path, nil
}

// jaegerConfig is a minimal Jaeger v2 configuration: OTLP in, memory store,
// query API out, every port on loopback, nothing else listening. Jaeger's
// own tracing stays off: with the tools module's OpenTelemetry SDK (lifted
// by GoReleaser) its tracer setup fails on a semantic-conventions schema
// mismatch.
const jaegerConfig = `service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:%d
    grpc:
      endpoint: 127.0.0.1:%d
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:%d
      http:
        endpoint: 127.0.0.1:%d
processors:
  batch:
    timeout: 50ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`

// jaeger is one running Jaeger, stopped at the end of the test.
type jaeger struct {
	// OTLPGRPCAddr and OTLPHTTPURL receive spans; QueryURL serves /api.
	OTLPGRPCAddr string
	OTLPHTTPURL  string
	QueryURL     string
}

// startJaeger runs Jaeger on free loopback ports and waits until both its
// query API answers and its OTLP gRPC port accepts.
func startJaeger(t testing.TB) *jaeger {
	t.Helper()
	binary := jaegerBinary(t)
	dir := t.TempDir()
	for attempt := 0; ; attempt++ {
		queryHTTP, queryGRPC, otlpGRPC, otlpHTTP := freePort(t), freePort(t), freePort(t), freePort(t)
		configPath := filepath.Join(dir, "jaeger.yaml")
		config := fmt.Sprintf(jaegerConfig, queryHTTP, queryGRPC, otlpGRPC, otlpHTTP)
		if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(binary, "--config", configPath)
		logs := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = logs, logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()

		j := &jaeger{
			OTLPGRPCAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(otlpGRPC)),
			OTLPHTTPURL:  "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(otlpHTTP)),
			QueryURL:     "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(queryHTTP)),
		}
		ready := waitUntil(60*time.Second, func() bool {
			select {
			case <-exited:
				return true
			default:
			}
			return j.answers() && accepts(j.OTLPGRPCAddr)
		})
		select {
		case <-exited:
			if attempt < 3 { // a port was taken between freePort and bind
				continue
			}
			t.Fatalf("jaeger exited at start:\n%s", logs.String())
		default:
		}
		if !ready {
			cmd.Process.Kill()
			<-exited
			t.Fatalf("jaeger did not get ready within 60s:\n%s", logs.String())
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			<-exited
			if t.Failed() {
				t.Logf("jaeger log:\n%s", logs.String())
			}
		})
		return j
	}
}

func (j *jaeger) answers() bool {
	resp, err := http.Get(j.QueryURL + "/api/services")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func accepts(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// jaegerTrace is a trace as Jaeger's query API (/api/traces/{id}) shows it.
type jaegerTrace struct {
	TraceID   string          `json:"traceID"`
	Spans     []jaegerSpan    `json:"spans"`
	Processes map[string]proc `json:"processes"`
}

type jaegerSpan struct {
	TraceID       string `json:"traceID"`
	SpanID        string `json:"spanID"`
	OperationName string `json:"operationName"`
	References    []struct {
		RefType string `json:"refType"`
		TraceID string `json:"traceID"`
		SpanID  string `json:"spanID"`
	} `json:"references"`
	Tags      []tag  `json:"tags"`
	ProcessID string `json:"processID"`
}

type proc struct {
	ServiceName string `json:"serviceName"`
	Tags        []tag  `json:"tags"`
}

type tag struct {
	Key   string `json:"key"`
	Type  string `json:"type"`
	Value any    `json:"value"`
}

// tagValue returns a tag's value as text (numbers and bools formatted as
// JSON writes them), and whether the tag is there.
func tagValue(tags []tag, key string) (string, bool) {
	for _, tg := range tags {
		if tg.Key == key {
			return fmt.Sprint(tg.Value), true
		}
	}
	return "", false
}

// parentOf returns the span's CHILD_OF parent id, or "".
func (s jaegerSpan) parentOf() string {
	for _, r := range s.References {
		if r.RefType == "CHILD_OF" {
			return r.SpanID
		}
	}
	return ""
}

// traces returns what Jaeger holds for traceID: no traces (404) until the
// first span of it is stored.
func (j *jaeger) traces(t testing.TB, traceID string) []jaegerTrace {
	t.Helper()
	resp, err := http.Get(j.QueryURL + "/api/traces/" + traceID)
	if err != nil {
		t.Fatalf("query jaeger: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("query jaeger: %s", resp.Status)
	}
	var body struct {
		Data []jaegerTrace `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatalf("decode jaeger answer: %v", err)
	}
	return body.Data
}
