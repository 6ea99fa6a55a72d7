package telemetry

import (
	"context"
	"log/slog"
	"net"

	"google.golang.org/grpc/stats"
)

// LimitGRPCConns wraps a gRPC server's listener so that it holds at most
// limits.Max connections, and limits.PerSource from one source (see
// connLimiter). It returns the listener to serve and a stats handler to
// install with grpc.StatsHandler: through it the limiter learns which
// connections have calls in progress and which have made any.
//
// At a cap, connections that never made a call go first: every connection
// of a flood of idle or half-open ones, whether or not it finished its
// handshake, and with mutual TLS every connection of a client without a
// certificate of the configured CA. Among them the victim is the oldest of
// the source holding the most, so a client connecting while others flood
// from elsewhere gets through its handshake to its first call. Connections
// that have made calls and are idle between them, like Flux's long-lived
// one between its HealthChecks, go only when no other is left; one with a
// call in progress is never closed.
func LimitGRPCConns(inner net.Listener, limits ConnLimits, logger *slog.Logger) (net.Listener, stats.Handler) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	l := newLimiter(inner, limits, "gRPC server", logger)
	l.byAddr = make(map[connAddrs]*limitedConn)
	return l, grpcConnStats{l}
}

// grpcConnStats follows a gRPC server's connections and calls for its
// connLimiter. gRPC names a connection to a stats handler by its addresses
// only; a TCP connection's pair of addresses is unique while it is open.
type grpcConnStats struct {
	limiter *connLimiter
}

// TagConn is called once a connection's handshake has finished: its calls
// find it in their context.
func (h grpcConnStats) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	l := h.limiter
	addrs := addrsOf(info.RemoteAddr, info.LocalAddr)
	if addrs == (connAddrs{}) {
		return ctx
	}
	l.mu.Lock()
	lc := l.byAddr[addrs]
	l.mu.Unlock()
	if lc == nil {
		return ctx
	}
	return context.WithValue(ctx, connKey{}, lc)
}

// HandleConn does nothing: a connection leaves the count when it is closed.
func (grpcConnStats) HandleConn(context.Context, stats.ConnStats) {}

// TagRPC leaves the call's context as it is: it already carries the
// connection's.
func (grpcConnStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return ctx
}

// HandleRPC marks the connection busy from a call's Begin to its End (gRPC
// reports both for every call it dispatches, or neither).
func (h grpcConnStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	lc, ok := ctx.Value(connKey{}).(*limitedConn)
	if !ok {
		return
	}
	switch s.(type) {
	case *stats.Begin:
		h.limiter.setBusy(lc, true)
	case *stats.End:
		h.limiter.setBusy(lc, false)
	}
}
