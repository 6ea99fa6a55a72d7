package telemetry

import (
	"container/list"
	"context"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// overflowLogInterval spaces the log lines about a full connection table: an
// attacker opening connections in a loop gets one line a minute, not one
// per connection.
const overflowLogInterval = time.Minute

// connLimiter is a listener that keeps at most limit connections open. When a
// new connection arrives at the cap, the connection idle for longest (one
// not inside a request handler: waiting for its first request, reading
// headers, or kept alive between requests) is closed to make room; only when
// every connection is inside a handler is the new one refused.
//
// Evicting rather than refusing is what keeps the endpoints reachable under
// a flood: refusing would let whoever connected first keep the port, so as
// many idle connections as the cap, renewed as they time out, would lock
// every scraper out. A legitimate client sends its request as soon as it
// connects, is inside the handler within a moment, and a connection in a
// handler is never evicted; an attacker's idle connections are always
// older. The cost of an eviction storm is accepting and closing, not memory
// or descriptors.
type connLimiter struct {
	net.Listener
	limit  int
	logger *slog.Logger

	mu       sync.Mutex
	open     int
	idle     list.List // *limitedConn not in a handler, longest idle first
	evicted  int
	refused  int
	lastNote time.Time
}

// limitedConn is one accepted connection; it leaves the count when closed.
type limitedConn struct {
	net.Conn
	limiter *connLimiter
	elem    *list.Element // in limiter.idle while not in a handler
	closed  bool
}

func newConnLimiter(inner net.Listener, limit int, logger *slog.Logger) *connLimiter {
	return &connLimiter{Listener: inner, limit: limit, logger: logger}
}

// Accept returns the next connection, closing the longest-idle one when
// the table is full, or closing the new one when no connection is idle.
func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		lc := &limitedConn{Conn: c, limiter: l}
		victim, admitted := l.admit(lc)
		if victim != nil {
			victim.Close()
		}
		if admitted {
			return lc, nil
		}
		c.Close()
	}
}

// admit counts lc in and names the connection to evict for it, if any.
func (l *connLimiter) admit(lc *limitedConn) (victim *limitedConn, admitted bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.limit {
		front := l.idle.Front()
		if front == nil {
			l.refused++
			l.noteOverflowLocked()
			return nil, false
		}
		victim = l.idle.Remove(front).(*limitedConn)
		victim.elem = nil
		l.evicted++
		l.noteOverflowLocked()
	}
	l.open++
	lc.elem = l.idle.PushBack(lc)
	return victim, true
}

// noteOverflowLocked logs the evictions and refusals, at most once per
// overflowLogInterval.
func (l *connLimiter) noteOverflowLocked() {
	now := time.Now()
	if !l.lastNote.IsZero() && now.Sub(l.lastNote) < overflowLogInterval {
		return
	}
	l.logger.Warn("metrics server at its connection cap: closing the longest-idle connections",
		"max_conns", l.limit, "evicted", l.evicted, "refused", l.refused)
	l.lastNote = now
	l.evicted, l.refused = 0, 0
}

// Close closes the connection and takes it out of the count; calling it
// again (the server does, after an eviction) only closes.
func (c *limitedConn) Close() error {
	l := c.limiter
	l.mu.Lock()
	if !c.closed {
		c.closed = true
		l.open--
		if c.elem != nil {
			l.idle.Remove(c.elem)
			c.elem = nil
		}
	}
	l.mu.Unlock()
	return c.Conn.Close()
}

// connKey finds a request's limitedConn in its context.
type connKey struct{}

// connContext is the http.Server's ConnContext: it lets the handler find
// the connection it serves.
func (l *connLimiter) connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// serving wraps h so that a connection is not evictable while a request on
// it is handled, and is the newest idle one afterwards.
func (l *connLimiter) serving(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lc, ok := r.Context().Value(connKey{}).(*limitedConn)
		if ok {
			l.setBusy(lc, true)
			defer l.setBusy(lc, false)
		}
		h.ServeHTTP(w, r)
	})
}

func (l *connLimiter) setBusy(lc *limitedConn, busy bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case lc.closed:
	case busy && lc.elem != nil:
		l.idle.Remove(lc.elem)
		lc.elem = nil
	case !busy && lc.elem == nil:
		lc.elem = l.idle.PushBack(lc)
	}
}
