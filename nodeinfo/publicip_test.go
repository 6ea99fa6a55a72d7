package nodeinfo

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// answer serves one fixed reply.
func answer(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}
}

// startServer serves handler on loopback until the test ends. release, if
// not nil, is closed before the server shuts down so blocked handlers can
// return.
func startServer(t *testing.T, handler http.Handler, release chan struct{}) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	if release != nil {
		t.Cleanup(func() { close(release) })
	}
	return srv
}

func TestLookupPublicIP(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    string
		wantErr error
	}{
		{name: "IPv4", handler: answer(200, "203.0.113.7"), want: "203.0.113.7"},
		{name: "IPv4 with a line ending", handler: answer(200, "203.0.113.7\r\n"), want: "203.0.113.7"},
		{name: "IPv6", handler: answer(200, "2001:db8:85a3::8a2e:370:7334\n"), want: "2001:db8:85a3::8a2e:370:7334"},
		{name: "IPv4-mapped IPv6", handler: answer(200, "::ffff:203.0.113.7"), want: "203.0.113.7"},
		{name: "private but routable", handler: answer(200, "10.20.30.40"), want: "10.20.30.40"},
		{name: "HTML", handler: answer(200, "<html><body>Your IP is 203.0.113.7</body></html>"), wantErr: ErrBadPublicIP},
		{name: "JSON", handler: answer(200, `{"ip":"203.0.113.7"}`), wantErr: ErrBadPublicIP},
		{name: "two addresses", handler: answer(200, "203.0.113.7 203.0.113.8"), wantErr: ErrBadPublicIP},
		{name: "empty", handler: answer(200, ""), wantErr: ErrBadPublicIP},
		{name: "loopback", handler: answer(200, "127.0.0.1"), wantErr: ErrBadPublicIP},
		{name: "unspecified", handler: answer(200, "0.0.0.0"), wantErr: ErrBadPublicIP},
		{name: "link-local", handler: answer(200, "169.254.1.1"), wantErr: ErrBadPublicIP},
		{name: "with a zone", handler: answer(200, "fe80::1%eth0"), wantErr: ErrBadPublicIP},
		{name: "huge body starting with an address", handler: answer(200, "203.0.113.7"+strings.Repeat(" ", 10<<20)), wantErr: ErrBadPublicIP},
		{name: "endless body", handler: func(w http.ResponseWriter, r *http.Request) {
			chunk := []byte("203.0.113.7" + strings.Repeat(" ", 32<<10))
			for r.Context().Err() == nil {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		}, wantErr: ErrBadPublicIP},
		{name: "service unavailable", handler: answer(503, "203.0.113.7"), wantErr: ErrPublicIPStatus},
		{name: "not found", handler: answer(404, "not found"), wantErr: ErrPublicIPStatus},
		{name: "redirect target fails", handler: func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/" {
				http.Redirect(w, r, "/elsewhere", http.StatusFound)
				return
			}
			w.WriteHeader(http.StatusBadGateway)
		}, wantErr: ErrPublicIPStatus},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startServer(t, tt.handler, nil)
			got, err := lookupPublicIP(t.Context(), srv.Client(), srv.URL, DefaultPublicIPTimeout)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("lookupPublicIP = %q, %v; want error %v", got, err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("lookupPublicIP = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestLookupPublicIPTimesOut(t *testing.T) {
	tests := []struct {
		name    string
		handler func(release chan struct{}) http.HandlerFunc
	}{
		{"no headers", func(release chan struct{}) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				select {
				case <-r.Context().Done():
				case <-release:
				}
			}
		}},
		{"headers but no body", func(release chan struct{}) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusOK)
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
				case <-release:
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			release := make(chan struct{})
			srv := startServer(t, tt.handler(release), release)

			got, err := lookupPublicIP(t.Context(), srv.Client(), srv.URL, 50*time.Millisecond)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("lookup of a stalled server = %q, %v; want context.DeadlineExceeded", got, err)
			}
		})
	}
}

func TestLookupPublicIPBadURL(t *testing.T) {
	if got, err := lookupPublicIP(t.Context(), nil, "://nope", DefaultPublicIPTimeout); err == nil {
		t.Fatalf("lookupPublicIP of a malformed URL = %q, want an error", got)
	}
}

var fastRetry = retryPolicy{attempts: 3, firstBackoff: time.Millisecond, maxBackoff: 2 * time.Millisecond, timeout: 5 * time.Second}

// countingServer answers with statuses in turn (the last one repeats) and
// body, counting requests.
func countingServer(t *testing.T, body string, statuses ...int) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(hits.Add(1))
		answer(statuses[min(n, len(statuses))-1], body)(w, r)
	}), nil)
	return srv, &hits
}

func waitSettled(t *testing.T, p *PublicIP) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("public IP never settled")
	}
}

func TestPublicIPConfiguredWins(t *testing.T) {
	srv, hits := countingServer(t, "203.0.113.7", 200)
	p := StartPublicIP(srv.URL, "198.51.100.1", srv.Client(), nil)
	defer p.Close()
	waitSettled(t, p)
	if got := p.Get(); got != "198.51.100.1" {
		t.Errorf("Get = %q, want the configured 198.51.100.1", got)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("%d lookups made despite a configured address", n)
	}
}

func TestPublicIPDisabled(t *testing.T) {
	p := StartPublicIP("", "", nil, nil)
	defer p.Close()
	waitSettled(t, p)
	if got := p.Get(); got != "" {
		t.Errorf("Get = %q with the lookup disabled, want \"\"", got)
	}
}

func TestPublicIPRetriesThenSucceeds(t *testing.T) {
	srv, hits := countingServer(t, "203.0.113.7", 503, 503, 200)
	p := startPublicIP(srv.URL, "", srv.Client(), nil, fastRetry)
	defer p.Close()
	waitSettled(t, p)
	if got := p.Get(); got != "203.0.113.7" {
		t.Errorf("Get = %q, want 203.0.113.7", got)
	}
	if n := hits.Load(); n != 3 {
		t.Errorf("%d lookups, want 3", n)
	}
}

func TestPublicIPGivesUp(t *testing.T) {
	srv, hits := countingServer(t, "", 503)
	var logs syncBuffer
	p := startPublicIP(srv.URL, "", srv.Client(), slog.New(slog.NewTextHandler(&logs, nil)), fastRetry)
	defer p.Close()
	waitSettled(t, p)
	if got := p.Get(); got != "" {
		t.Errorf("Get = %q after every lookup failed, want \"\"", got)
	}
	if n := hits.Load(); n != int32(fastRetry.attempts) {
		t.Errorf("%d lookups, want %d", n, fastRetry.attempts)
	}
	if n := logs.count("level=WARN"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, logs.String())
	}
}

// Start-up does not wait for the lookup: the address is "" while the
// service has not answered, and appears once it has.
func TestPublicIPDoesNotDelayStart(t *testing.T) {
	entered := make(chan struct{})
	answerNow := make(chan struct{})
	srv := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-answerNow
		answer(200, "203.0.113.7")(w, r)
	}), nil)
	p := StartPublicIP(srv.URL, "", srv.Client(), nil)
	defer p.Close()
	<-entered
	if got := p.Get(); got != "" {
		t.Errorf("Get = %q before the service answered, want \"\"", got)
	}
	select {
	case <-p.Done():
		close(answerNow)
		t.Fatal("settled before the service answered")
	default:
	}
	close(answerNow)
	waitSettled(t, p)
	if got := p.Get(); got != "203.0.113.7" {
		t.Errorf("Get = %q, want 203.0.113.7", got)
	}
}

func TestPublicIPCloseStopsLookup(t *testing.T) {
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	srv := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}), release)
	p := startPublicIP(srv.URL, "", srv.Client(), nil, retryPolicy{attempts: 5, firstBackoff: time.Hour, maxBackoff: time.Hour, timeout: time.Hour})
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- p.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not stop a lookup in progress")
	}
	if got := p.Get(); got != "" {
		t.Errorf("Get = %q after Close, want \"\"", got)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestIPs(t *testing.T) {
	srv, _ := countingServer(t, "203.0.113.7", 200)
	t.Run("configured", func(t *testing.T) {
		ips := StartIPs("10.0.0.5", "198.51.100.1", srv.URL, srv.Client(), nil)
		defer ips.Close()
		<-ips.publicIPSettled()
		if ips.PrivateIP() != "10.0.0.5" || ips.PublicIP() != "198.51.100.1" {
			t.Errorf("IPs = %q, %q; want the configured 10.0.0.5, 198.51.100.1", ips.PrivateIP(), ips.PublicIP())
		}
	})
	t.Run("found out", func(t *testing.T) {
		ips := StartIPs("", "", srv.URL, srv.Client(), nil)
		defer ips.Close()
		select {
		case <-ips.publicIPSettled():
		case <-time.After(10 * time.Second):
			t.Fatal("public IP never settled")
		}
		if ips.PublicIP() != "203.0.113.7" {
			t.Errorf("PublicIP = %q, want 203.0.113.7", ips.PublicIP())
		}
		if want, err := PrivateIPv4(); err == nil && ips.PrivateIP() != want {
			t.Errorf("PrivateIP = %q, want %q", ips.PrivateIP(), want)
		}
	})
}

func BenchmarkPublicIPGet(b *testing.B) {
	p := StartPublicIP("", "198.51.100.1", nil, nil)
	defer p.Close()
	for b.Loop() {
		if p.Get() == "" {
			b.Fatal("empty")
		}
	}
}
