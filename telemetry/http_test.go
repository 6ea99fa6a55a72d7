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
	"time"
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

// openConns returns how many connections the server counts as open.
func (s *HTTPServer) openConns() int {
	l := s.listener.(*connLimiter)
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// closedByServer reports whether the server closed c, waiting up to wait.
func closedByServer(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	var netErr net.Error
	return err != nil && !(errors.As(err, &netErr) && netErr.Timeout())
}

func testLimits() httpLimits {
	l := defaultHTTPLimits
	l.maxConns = 8
	return l
}

func dialAll(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	return conns
}

// getFresh makes one request on a new connection, as a probe does.
func getFresh(t *testing.T, url string) (int, time.Duration) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, time.Since(start)
}

// TestHTTPEvictsLongestIdleConnectionsAtTheCap floods the server with idle
// and half-sent connections, six times its cap: a probe still gets in at
// once, the server holds no more than its cap, and it closed the oldest.
func TestHTTPEvictsLongestIdleConnectionsAtTheCap(t *testing.T) {
	srv, err := listenHTTP("127.0.0.1:0", http.NotFoundHandler(), nil, nil, testLimits())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	addr := srv.Addr().String()

	conns := dialAll(t, addr, 50)
	for _, c := range conns[:25] {
		io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n") // headers never finished
	}
	for range 5 {
		if code, took := getFresh(t, "http://"+addr+"/healthz"); code != http.StatusOK || took > time.Second {
			t.Errorf("/healthz under a flood: %d in %v, want 200 within 1s", code, took)
		}
	}
	if open := srv.openConns(); open > 8 {
		t.Errorf("server holds %d connections, cap 8", open)
	}
	if !closedByServer(conns[0], 5*time.Second) {
		t.Error("the oldest idle connection is still open")
	}
	if closedByServer(conns[len(conns)-1], 100*time.Millisecond) {
		t.Error("the newest attacker connection was closed before older ones")
	}
}

// TestHTTPRefusesOnlyWhenEveryConnectionIsBusy: connections inside a handler
// are never evicted; a new one is refused then, and served once one frees.
func TestHTTPRefusesOnlyWhenEveryConnectionIsBusy(t *testing.T) {
	limits := testLimits()
	limits.maxConns = 2
	entered, release := make(chan struct{}), make(chan struct{})
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-release
	})
	srv, err := listenHTTP("127.0.0.1:0", slow, nil, nil, limits)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	base := "http://" + srv.Addr().String()

	done := make(chan int, 2)
	for range 2 {
		go func() {
			resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Get(base + "/metrics")
			if err != nil {
				done <- 0
				return
			}
			resp.Body.Close()
			done <- resp.StatusCode
		}()
	}
	<-entered
	<-entered
	c := dialAll(t, srv.Addr().String(), 1)[0]
	if !closedByServer(c, 5*time.Second) {
		t.Error("a third connection was kept while both slots serve requests")
	}
	close(release)
	for range 2 {
		if code := <-done; code != http.StatusOK {
			t.Errorf("busy request answered %d, want 200: it was evicted", code)
		}
	}
	if code, _ := getFresh(t, base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz after the busy requests: %d", code)
	}
}

// TestHTTPTimesOutSilentConnectionsAndBigHeaders: a connection that sends
// nothing is closed after the header timeout, and oversized headers are
// refused.
func TestHTTPTimesOutSilentConnectionsAndBigHeaders(t *testing.T) {
	limits := testLimits()
	limits.readHeader = 200 * time.Millisecond
	srv, err := listenHTTP("127.0.0.1:0", http.NotFoundHandler(), nil, nil, limits)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	c := dialAll(t, srv.Addr().String(), 1)[0]
	start := time.Now()
	if !closedByServer(c, 5*time.Second) {
		t.Fatal("silent connection still open after 5s")
	}
	t.Logf("silent connection closed after %v", time.Since(start))

	req, _ := http.NewRequest("GET", "http://"+srv.Addr().String()+"/healthz", nil)
	req.Header.Set("X-Big", strings.Repeat("b", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB header answered %d, want 431", resp.StatusCode)
	}
	http.DefaultClient.CloseIdleConnections()
}
