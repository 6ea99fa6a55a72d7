package telemetry

import (
	"container/list"
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// overflowLogInterval spaces the log lines about a full connection table: an
// attacker opening connections in a loop gets one line a minute, not one
// per connection.
const overflowLogInterval = time.Minute

// ConnLimits bound the connections one server holds open.
type ConnLimits struct {
	// Max caps all open connections.
	Max int
	// PerSource caps the connections from one source: an IPv4 address, or
	// an IPv6 /64 (what one host is usually given). 0 means only Max applies.
	PerSource int
}

// connStage is what an idle connection has shown of itself: unproven ones
// are evicted first.
type connStage int

const (
	// stageNew: accepted, but no request served (HTTP) or no call made
	// (gRPC) yet. Every flood connection stays here: silent, half-open,
	// and, where the handshake proves nothing (plaintext gRPC), one that
	// finished its handshake and went silent.
	stageNew connStage = iota
	// stageUsed: the connection has served a request or a call.
	stageUsed
	numStages
)

// connLimiter is a listener that keeps at most limits.Max connections open,
// and at most limits.PerSource from one source. When a new connection
// arrives at a cap, an idle connection (one not inside a request handler
// or an RPC) is closed to make room: one that has never served a request
// or a call if there is any, else one that has; from the source holding
// the most such connections; the oldest of them. At the per-source cap the
// victim comes from the new connection's own source. Only when every
// candidate is busy is the new connection refused.
//
// Evicting rather than refusing is what keeps a server reachable under a
// flood: refusing would let whoever connected first keep the port, so as
// many idle connections as the cap, renewed as they time out, would lock
// every legitimate client out. A legitimate client sends its request as
// soon as it connects; until then it is the newest connection of a source
// that holds few, and afterwards it outranks every connection that never
// made one. An attacker's connections are older, or come from a source
// that holds more. The cost of an eviction storm is accepting and closing,
// not memory or descriptors.
type connLimiter struct {
	net.Listener
	limits ConnLimits
	name   string // in log lines: "metrics server", "gRPC server"
	logger *slog.Logger

	mu      sync.Mutex
	open    int
	idle    [numStages]int // idle connections at each stage, all sources
	sources map[netip.Prefix]*connSource
	// byAddr finds a connection by its addresses, for a gRPC stats handler
	// that is told only those; nil when nothing needs it.
	byAddr   map[connAddrs]*limitedConn
	evicted  int
	refused  int
	lastNote time.Time
}

// connSource is one source's connections.
type connSource struct {
	key   netip.Prefix
	conns int
	idle  [numStages]list.List // its idle *limitedConn at each stage, longest idle first
}

// connAddrs names a TCP connection; no two open ones share it.
type connAddrs struct {
	remote, local netip.AddrPort
}

// limitedConn is one accepted connection; it leaves the count when closed.
type limitedConn struct {
	net.Conn
	limiter *connLimiter
	addrs   connAddrs
	source  *connSource
	stage   connStage
	busy    int           // requests or RPCs in progress
	elem    *list.Element // in source.idle[stage] while idle
	since   time.Time     // when it was accepted, or last became idle
	evicted bool
	closed  bool
}

func newConnLimiter(inner net.Listener, limit int, logger *slog.Logger) *connLimiter {
	return newLimiter(inner, ConnLimits{Max: limit}, "metrics server", logger)
}

func newLimiter(inner net.Listener, limits ConnLimits, name string, logger *slog.Logger) *connLimiter {
	return &connLimiter{Listener: inner, limits: limits, name: name, logger: logger,
		sources: make(map[netip.Prefix]*connSource)}
}

// Accept returns the next connection, closing an idle one when a cap is
// reached, or closing the new one when no candidate is idle.
func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		lc := &limitedConn{Conn: c, limiter: l, addrs: addrsOf(c.RemoteAddr(), c.LocalAddr())}
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

// addrsOf is a TCP connection's addresses; the zero value for anything else.
func addrsOf(remote, local net.Addr) connAddrs {
	r, rok := remote.(*net.TCPAddr)
	l, lok := local.(*net.TCPAddr)
	if !rok || !lok {
		return connAddrs{}
	}
	return connAddrs{remote: r.AddrPort(), local: l.AddrPort()}
}

// sourceOf groups addresses by who holds them: an IPv4 address, or an IPv6
// /64, since one host usually has a whole /64 to pick addresses from.
func sourceOf(addr netip.Addr) netip.Prefix {
	addr = addr.Unmap()
	bits := addr.BitLen()
	if addr.Is6() {
		bits = 64
	}
	p, err := addr.Prefix(bits)
	if err != nil { // not an IP address (not TCP): one source for all
		return netip.Prefix{}
	}
	return p
}

// admit counts lc in and names the connection to evict for it, if any.
func (l *connLimiter) admit(lc *limitedConn) (victim *limitedConn, admitted bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	key := sourceOf(lc.addrs.remote.Addr())
	src := l.sources[key]
	if src == nil {
		src = &connSource{key: key}
		l.sources[key] = src
	}
	full := true
	switch {
	case l.limits.PerSource > 0 && src.conns >= l.limits.PerSource:
		victim = src.leastValuable()
	case l.open >= l.limits.Max:
		victim = l.leastValuable()
	default:
		full = false
	}
	if full {
		if victim == nil {
			l.refused++
			l.noteOverflowLocked()
			if src.conns == 0 {
				delete(l.sources, key)
			}
			return nil, false
		}
		l.unidleLocked(victim)
		victim.evicted = true
		l.evicted++
		l.noteOverflowLocked()
	}
	l.open++
	src.conns++
	lc.source = src
	lc.stage = stageNew
	l.idleLocked(lc)
	if l.byAddr != nil && lc.addrs != (connAddrs{}) {
		l.byAddr[lc.addrs] = lc
	}
	return victim, true
}

// leastValuable is the source's oldest idle connection that never served,
// else its oldest idle one; nil when all of its connections are busy.
func (s *connSource) leastValuable() *limitedConn {
	for stage := range numStages {
		if front := s.idle[stage].Front(); front != nil {
			return front.Value.(*limitedConn)
		}
	}
	return nil
}

// leastValuable is the oldest idle connection that never served, from the
// source holding the most of them; if there is none, the same among idle
// connections that did. Counting only those, not all of a source's
// connections, keeps a client's busy or used connections from counting
// against its new one. It looks at every source (as many as there are
// connections at most), and only when the table is full.
func (l *connLimiter) leastValuable() *limitedConn {
	for stage := range numStages {
		if l.idle[stage] == 0 {
			continue
		}
		var best *connSource
		for _, src := range l.sources {
			n := src.idle[stage].Len()
			if n == 0 {
				continue
			}
			if best == nil || n > best.idle[stage].Len() ||
				n == best.idle[stage].Len() && src.front(stage).since.Before(best.front(stage).since) {
				best = src
			}
		}
		return best.front(stage)
	}
	return nil
}

func (s *connSource) front(stage connStage) *limitedConn {
	return s.idle[stage].Front().Value.(*limitedConn)
}

// idleLocked files lc as idle at its stage, as the most recent.
func (l *connLimiter) idleLocked(lc *limitedConn) {
	lc.since = time.Now()
	lc.elem = lc.source.idle[lc.stage].PushBack(lc)
	l.idle[lc.stage]++
}

// unidleLocked takes lc out of the idle connections, if it is among them.
func (l *connLimiter) unidleLocked(lc *limitedConn) {
	if lc.elem == nil {
		return
	}
	lc.source.idle[lc.stage].Remove(lc.elem)
	lc.elem = nil
	l.idle[lc.stage]--
}

// noteOverflowLocked logs the evictions and refusals, at most once per
// overflowLogInterval.
func (l *connLimiter) noteOverflowLocked() {
	now := time.Now()
	if !l.lastNote.IsZero() && now.Sub(l.lastNote) < overflowLogInterval {
		return
	}
	l.logger.Warn(l.name+" at its connection cap: closing the longest-idle connections",
		"max_conns", l.limits.Max, "max_conns_per_source", l.limits.PerSource, "evicted", l.evicted, "refused", l.refused)
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
		l.unidleLocked(c)
		l.open--
		c.source.conns--
		if c.source.conns == 0 {
			delete(l.sources, c.source.key)
		}
		if l.byAddr != nil && l.byAddr[c.addrs] == c {
			delete(l.byAddr, c.addrs)
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

// setBusy counts a request or an RPC in (busy) or out on lc: a connection
// with one in progress is never evicted, and one that has served any is
// used.
func (l *connLimiter) setBusy(lc *limitedConn, busy bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if busy {
		lc.busy++
		l.unidleLocked(lc)
		lc.stage = stageUsed
		return
	}
	lc.busy--
	if lc.busy == 0 && !lc.closed && !lc.evicted {
		l.idleLocked(lc)
	}
}
