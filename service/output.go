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

// outputWriteTimeout bounds one write of live output; a Redis that hangs
// delays live output, never the execution.
const outputWriteTimeout = 5 * time.Second

// outputRetryInterval paces retries while Redis refuses writes.
const outputRetryInterval = time.Second

// outputFlusher streams an execution's new output to Redis while it runs.
// It owns the output's write offset until stop returns.
type outputFlusher struct {
	sink   *outputSink
	state  *state
	id     string
	logger *slog.Logger
	onErr  func(ctx context.Context)

	written int64 // bytes of output in Redis
	quit    chan struct{}
	done    chan struct{}
}

func startOutputFlusher(ctx context.Context, f *outputFlusher) *outputFlusher {
	f.quit = make(chan struct{})
	f.done = make(chan struct{})
	go f.run(ctx)
	return f
}

func (f *outputFlusher) run(ctx context.Context) {
	defer close(f.done)
	failing := false
	pace := time.NewTimer(outputFlushInterval)
	defer pace.Stop()
	for {
		select {
		case <-f.quit:
			return
		case <-f.sink.ready:
		}
		wait := outputFlushInterval
		if chunk := f.sink.take(); len(chunk) > 0 {
			writeCtx, cancel := context.WithTimeout(ctx, outputWriteTimeout)
			err := f.state.writeOutput(writeCtx, f.id, f.written, chunk)
			cancel()
			switch {
			case err != nil:
				f.sink.putBack(chunk)
				f.onErr(ctx)
				if !failing {
					f.logger.WarnContext(ctx, "live output not written; retrying every second", "error", err)
				}
				failing, wait = true, outputRetryInterval
			default:
				f.written += int64(len(chunk))
				if failing {
					f.logger.InfoContext(ctx, "live output written again")
				}
				failing = false
			}
		}
		pace.Reset(wait)
		select {
		case <-f.quit:
			return
		case <-pace.C:
		}
	}
}

// stop ends the flusher after the write under way, if any, and returns the
// offset where the rest of the output goes.
func (f *outputFlusher) stop() int64 {
	close(f.quit)
	<-f.done
	return f.written
}
