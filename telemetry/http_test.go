package telemetry

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestListenHTTPServesOperationalEndpoints(t *testing.T) {
	clearOTelEnv(t)
	tel, err := Setup(context.Background(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tel.Shutdown(shutdownCtx(t)) })
	tel.Metrics.RedisError(context.Background(), "set")

	errNoRedis := errors.New("redis: connection refused")
	var notReady atomic.Pointer[error]
	notReady.Store(&errNoRedis)
	ready := func(context.Context) error {
		if err := notReady.Load(); err != nil {
			return *err
		}
		return nil
	}

	srv, err := ListenHTTP("127.0.0.1:0", tel.PrometheusHandler, ready, nil)
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + srv.Addr().String()

	if code, body := get(t, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz = %d %q, want 200 ok", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "redis: connection refused") {
		t.Errorf("/readyz while not ready = %d %q, want 503 with the reason", code, body)
	}
	notReady.Store(nil)
	if code, body := get(t, base+"/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz when ready = %d %q, want 200 ok", code, body)
	}
	if code, body := get(t, base+"/metrics"); code != http.StatusOK || !strings.Contains(body, `flux_redis_errors_total{operation="set"} 1`) {
		t.Errorf("/metrics = %d, want 200 with flux_redis_errors_total:\n%s", code, body)
	}
	if code, _ := get(t, base+"/nothing"); code != http.StatusNotFound {
		t.Errorf("/nothing = %d, want 404", code)
	}

	if err := srv.Close(context.Background()); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Errorf("server still answers after Close")
	}
	http.DefaultClient.CloseIdleConnections()
}

func TestListenHTTPReportsTakenAddress(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()

	srv, err := ListenHTTP(taken.Addr().String(), http.NotFoundHandler(), nil, nil)
	if err == nil {
		_ = srv.Close(context.Background())
		t.Fatal("ListenHTTP on a taken address succeeded")
	}
}

func TestListenHTTPWithoutReadyCheckIsReady(t *testing.T) {
	srv, err := ListenHTTP("127.0.0.1:0", http.NotFoundHandler(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := srv.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
		http.DefaultClient.CloseIdleConnections()
	}()
	if code, _ := get(t, "http://"+srv.Addr().String()+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz with no check = %d, want 200", code)
	}
}
