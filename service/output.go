package service

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// outputFlushInterval paces writes of live output to Redis: new output
// reaches Redis within this interval plus one round trip, and a chatty
// function costs at most one APPEND per interval.
const outputFlushInterval = 100 * time.Millisecond

// outputSink receives a function's stdout and stderr (already merged into
// one stream by the sandbox), keeps at most limit bytes of it, and holds the
// bytes not yet sent to Redis. Writes never fail: a function whose output
// is over the limit keeps running; its output is cut with a marker.
type outputSink struct {
	limit int64
	// keepAll holds the whole (limited) output for a sync response.
	keepAll bool

	mu        sync.Mutex
	total     int64 // bytes the function wrote
	kept      int64 // bytes kept, at most limit
	truncated bool
	pending   []byte // kept bytes not yet in Redis
	all       []byte

	// ready has a value when pending is non-empty.
	ready chan struct{}
}

func newOutputSink(limit int64, keepAll bool) *outputSink {
	return &outputSink{limit: limit, keepAll: keepAll, ready: make(chan struct{}, 1)}
}

// Write implements io.Writer.
func (o *outputSink) Write(p []byte) (int, error) {
	o.mu.Lock()
	o.total += int64(len(p))
	take := int64(len(p))
	if room := o.limit - o.kept; take > room {
		take = room
	}
	if take > 0 {
		o.add(p[:take])
		o.kept += take
	}
	if int64(len(p)) > take && !o.truncated {
		o.truncated = true
		o.add(fmt.Appendf(nil, "\n[flux-agent: output truncated: it exceeded the %d-byte output limit]\n", o.limit))
	}
	o.mu.Unlock()
	o.signal()
	return len(p), nil
}

func (o *outputSink) add(b []byte) {
	o.pending = append(o.pending, b...)
	if o.keepAll {
		o.all = append(o.all, b...)
	}
}

// take returns the bytes not yet sent and forgets them.
func (o *outputSink) take() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	chunk := o.pending
	o.pending = nil
	return chunk
}

// putBack returns a chunk that could not be sent, ahead of newer bytes.
func (o *outputSink) putBack(chunk []byte) {
	o.mu.Lock()
	o.pending = append(chunk, o.pending...)
	o.mu.Unlock()
	o.signal()
}

func (o *outputSink) signal() {
	select {
	case o.ready <- struct{}{}:
	default:
	}
}

type outputStats struct {
	total     int64
	truncated bool
	all       []byte
}

func (o *outputSink) stats() outputStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return outputStats{total: o.total, truncated: o.truncated, all: o.all}
}

// outputFlusher streams an execution's new output to Redis while it runs.
type outputFlusher struct {
	sink   *outputSink
	state  *state
	id     string
	logger *slog.Logger
	onErr  func(ctx context.Context)

	cancel context.CancelFunc
	done   chan struct{}
}

func startOutputFlusher(ctx context.Context, f *outputFlusher) *outputFlusher {
	ctx, f.cancel = context.WithCancel(ctx)
	f.done = make(chan struct{})
	go f.run(ctx)
	return f
}

func (f *outputFlusher) run(ctx context.Context) {
	defer close(f.done)
	pace := time.NewTimer(0)
	defer pace.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.sink.ready:
		}
		if chunk := f.sink.take(); len(chunk) > 0 {
			if err := f.state.appendOutput(ctx, f.id, chunk); err != nil {
				f.sink.putBack(chunk)
				if ctx.Err() == nil {
					f.logger.WarnContext(ctx, "live output not written; retrying", "error", err)
					f.onErr(ctx)
				}
			}
		}
		pace.Reset(outputFlushInterval)
		select {
		case <-ctx.Done():
			return
		case <-pace.C:
		}
	}
}

// stop ends the flusher and waits for its last write, so the caller can
// send what is left after it, in order.
func (f *outputFlusher) stop() {
	f.cancel()
	<-f.done
}
