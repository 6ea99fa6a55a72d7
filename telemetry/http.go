package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// DefaultMetricsAddress is where /metrics, /healthz and /readyz are served
// unless the config's metrics_address says otherwise: loopback, because the
// endpoints are unauthenticated.
const DefaultMetricsAddress = "127.0.0.1:9464"

// readyCheckTimeout bounds one /readyz check, so a hung dependency makes the
// probe fail rather than hang.
const readyCheckTimeout = 5 * time.Second

// httpLimits bound what clients of the operational endpoints can hold.
type httpLimits struct {
	// maxConns caps open connections; past it an idle one is closed to let
	// a new one in, one that never served a request first (see
	// connLimiter).
	maxConns int
	// readHeader bounds reading a request's headers, from the connection's
	// first byte (or the end of the previous request); read bounds reading
	// the whole request; write bounds the handler and writing the answer;
	// idle bounds waiting for the next request on a kept-alive connection.
	readHeader, read, write, idle time.Duration
	// maxHeaderBytes caps a request's headers (net/http allows 4 KiB more).
	maxHeaderBytes int
}

// defaultHTTPLimits fit what uses the endpoints: Prometheus scrapes (one
// keep-alive connection per scraper, a scrape timeout of 10 s by default)
// and liveness/readiness probes (a new connection each, small GETs). 64
// connections are ten times what a node sees and cost about 2 MiB at most;
// the write timeout leaves room for the /readyz check's own 5 s.
var defaultHTTPLimits = httpLimits{
	maxConns:       64,
	readHeader:     5 * time.Second,
	read:           10 * time.Second,
	write:          readyCheckTimeout + 10*time.Second,
	idle:           30 * time.Second,
	maxHeaderBytes: 8 << 10,
}

// HTTPServer serves the agent's operational endpoints. It owns the goroutine
// that serves; Close stops it and waits.
type HTTPServer struct {
	listener net.Listener
	server   *http.Server
	served   chan struct{}
}

// ListenHTTP binds addr now, so a taken port is an error at start-up, and
// serves in the background:
//
//	/metrics  metrics (usually Telemetry.PrometheusHandler)
//	/healthz  200 while the process is alive
//	/readyz   200 when ready returns nil, else 503 with the reason; a nil
//	          ready is always ready
//
// Clients cannot exhaust the agent through it: requests are bounded in time
// and header size, and at most 64 connections are open at once. Past that
// the longest-idle connection is closed to let the new one in, so a flood of
// idle connections cannot lock out a scraper (see connLimiter).
func ListenHTTP(addr string, metrics http.Handler, ready func(context.Context) error, logger *slog.Logger) (*HTTPServer, error) {
	return listenHTTP(addr, metrics, ready, logger, defaultHTTPLimits)
}

func listenHTTP(addr string, metrics http.Handler, ready func(context.Context) error, logger *slog.Logger, limits httpLimits) (*HTTPServer, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if ready != nil {
			ctx, cancel := context.WithTimeout(r.Context(), readyCheckTimeout)
			defer cancel()
			if err := ready(ctx); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintf(w, "not ready: %v\n", err)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})

	inner, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	listener := newConnLimiter(inner, limits.maxConns, logger)
	s := &HTTPServer{
		listener: listener,
		server: &http.Server{
			Handler:           listener.serving(mux),
			ConnContext:       listener.connContext,
			ReadHeaderTimeout: limits.readHeader,
			ReadTimeout:       limits.read,
			WriteTimeout:      limits.write,
			IdleTimeout:       limits.idle,
			MaxHeaderBytes:    limits.maxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		},
		served: make(chan struct{}),
	}
	go func() {
		defer close(s.served)
		if err := s.server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("metrics server stopped", "addr", listener.Addr().String(), "err", err)
		}
	}()
	return s, nil
}

// Addr is the address the server listens on (the real port when addr had :0).
func (s *HTTPServer) Addr() net.Addr {
	return s.listener.Addr()
}

// Close stops accepting, lets requests in flight finish until ctx ends, then
// drops the rest, and waits for the serving goroutine.
func (s *HTTPServer) Close(ctx context.Context) error {
	err := s.server.Shutdown(ctx)
	if err != nil {
		err = errors.Join(fmt.Errorf("metrics server shutdown: %w", err), s.server.Close())
	}
	<-s.served
	return err
}
