package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Pauses between rounds of writing pending final records: the first after
// a failure, doubling up to the last, which bounds how long a record waits
// once Redis answers again.
const (
	finalRetryFirst = 250 * time.Millisecond
	finalRetryMax   = 2 * time.Second
)

// maxPendingFinals bounds the final records waiting for Redis at once. A
// pending record costs its Record (a few hundred bytes) and, when the
// execution printed anything, one open spool file holding its output on
// disk: memory and file descriptors stay bounded whatever the outage and
// the outputs. Past it the oldest is given up: its record keeps saying
// running and the upkeep settles it as failed once Redis answers. New
// executions cannot start while Redis refuses their claims, so only
// executions already running when Redis failed can reach it.
const maxPendingFinals = 1024

// reasonFinalDropped is the error a given-up final record ends with.
const reasonFinalDropped = "the execution ended, but the agent could not record how: Redis was unavailable for too long"

// pendingFinal is the final record of an execution that ended while Redis
// failed, with what Redis needs besides it.
type pendingFinal struct {
	rec  Record // final
	copy *spool // the whole output; nil when there is none or the disk failed
	size int64  // the output's length (what the copy holds)

	// Owned by the retrying goroutine.
	written  int64 // Redis holds the output before this, as far as known
	unlisted bool  // may be off the running set: put it back first

	// readers is held by GetExecution while it reads copy; closing takes
	// it for writing.
	readers sync.RWMutex
	closed  bool
}

// finals keeps the final records that could not be written when their
// executions ended and writes them in the background until Redis takes
// them, without an agent restart; GetExecution answers from them meanwhile.
// Each stays in the running set until it is written, so if the agent stops
// first, its next start settles it.
type finals struct {
	state   *state
	logger  *slog.Logger
	metrics Metrics
	// dropped is told the ids given up past limit.
	dropped func(id string)
	limit   int // maxPendingFinals

	kick chan struct{} // a record came, or a caller waits for one

	mu      sync.Mutex
	pending map[string]*pendingFinal
	order   []string  // ids, oldest first
	since   time.Time // when the outage began; zero when none
	written int       // records written since
}

func newFinals(st *state, logger *slog.Logger, metrics Metrics, dropped func(id string)) *finals {
	return &finals{state: st, logger: logger, metrics: metrics, dropped: dropped, limit: maxPendingFinals,
		kick: make(chan struct{}, 1), pending: map[string]*pendingFinal{}}
}

// add takes over a final record that could not be written (err says why)
// and has it written in the background. The first record of an outage is
// logged; the others are counted in the line that ends it.
func (f *finals) add(ctx context.Context, pf *pendingFinal, err error) {
	f.mu.Lock()
	var old *pendingFinal
	if len(f.order) >= f.limit {
		old = f.pending[f.order[0]]
		delete(f.pending, f.order[0])
		f.order = f.order[1:]
	}
	f.pending[pf.rec.ExecutionID] = pf
	f.order = append(f.order, pf.rec.ExecutionID)
	first := f.since.IsZero()
	if first {
		f.since, f.written = time.Now(), 0
	}
	f.mu.Unlock()
	if first {
		f.logger.WarnContext(ctx, "final records not written: Redis fails; retrying in the background", "err", err)
	}
	if old != nil {
		f.logger.ErrorContext(ctx, "final record given up: too many wait for Redis; it will be settled as failed",
			"execution_id", old.rec.ExecutionID, "status", old.rec.Status, "limit", f.limit)
		old.close()
		f.dropped(old.rec.ExecutionID)
	}
	signal(f.kick)
}

// get returns the pending final record of id, or nil.
func (f *finals) get(id string) *pendingFinal {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pending[id]
}

// has reports whether id's final record waits for Redis.
func (f *finals) has(id string) bool { return f.get(id) != nil }

// count is how many final records wait for Redis.
func (f *finals) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pending)
}

// run writes pending records until ctx ends: at once when one comes, then
// after each failed round with a growing pause.
func (f *finals) run(ctx context.Context) {
	retry := time.NewTimer(finalRetryFirst)
	retry.Stop()
	defer retry.Stop()
	pause := finalRetryFirst
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.kick:
		case <-retry.C:
		}
		if f.writeRound(ctx) {
			pause = finalRetryFirst
			continue
		}
		retry.Reset(pause)
		pause = min(2*pause, finalRetryMax)
	}
}

// writeRound tries the pending records, oldest first, and reports whether
// none is left. A round ends at the first failure once it has spent a
// try's time: against a stalled server each try waits out its timeout,
// while in a Cluster a record on a failed node must not hold up those on
// the others.
func (f *finals) writeRound(ctx context.Context) bool {
	f.mu.Lock()
	ids := slices.Clone(f.order)
	f.mu.Unlock()
	start := time.Now()
	for _, id := range ids {
		pf := f.get(id)
		if pf == nil {
			continue
		}
		err := f.write(ctx, pf)
		if err == nil {
			f.remove(pf)
			continue
		}
		f.metrics.RedisError(ctx, "finish_record")
		if ctx.Err() != nil || time.Since(start) >= redisTryTimeout {
			break
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.pending) > 0 {
		return false
	}
	if !f.since.IsZero() {
		f.logger.InfoContext(ctx, "final records written again", "count", f.written, "outage", time.Since(f.since).Round(time.Millisecond))
		f.since = time.Time{}
	}
	return true
}

// write stores a pending record: back on the running set if it may have
// left it, then the output Redis lacks, then the record.
func (f *finals) write(ctx context.Context, pf *pendingFinal) error {
	// Held so that a record given up meanwhile keeps its copy until then.
	pf.readers.RLock()
	defer pf.readers.RUnlock()
	if pf.closed {
		return nil
	}
	id := pf.rec.ExecutionID
	try := func(fn func(ctx context.Context) error) error {
		ctx, cancel := context.WithTimeout(ctx, redisTryTimeout)
		defer cancel()
		return fn(ctx)
	}
	if pf.unlisted {
		if err := try(func(ctx context.Context) error { return f.state.relist(ctx, id) }); err != nil {
			return err
		}
		pf.unlisted = false
	}
	for rewrites := 0; ; rewrites++ {
		if err := f.writeOutput(ctx, pf, try); err != nil {
			return err
		}
		var unlisted bool
		err := try(func(ctx context.Context) error {
			var err error
			unlisted, err = f.state.finishRecord(ctx, &pf.rec, nil, pf.written)
			return err
		})
		var gap *outputGapError
		if errors.As(err, &gap) && rewrites < maxRewrites {
			pf.written = gap.have // Redis lost output: write it again
			continue
		}
		pf.unlisted = unlisted
		return err
	}
}

// writeOutput writes the output Redis lacks from the copy, a chunk at a
// time. Without a copy (the disk failed) what Redis lost stays lost.
func (f *finals) writeOutput(ctx context.Context, pf *pendingFinal, try func(func(context.Context) error) error) error {
	if pf.written >= pf.size || pf.copy == nil {
		return nil
	}
	buf := make([]byte, min(pf.size-pf.written, rewriteChunkBytes))
	for rewrites := 0; pf.written < pf.size; {
		chunk := buf[:min(int64(len(buf)), pf.size-pf.written)]
		if err := pf.copy.readAt(chunk, pf.written); err != nil {
			return err
		}
		err := try(func(ctx context.Context) error {
			return f.state.writeOutput(ctx, pf.rec.ExecutionID, pf.written, chunk)
		})
		var gap *outputGapError
		switch {
		case errors.As(err, &gap) && rewrites < maxRewrites:
			rewrites++
			pf.written = gap.have
		case err != nil:
			return err
		default:
			pf.written += int64(len(chunk))
		}
	}
	return nil
}

// remove forgets a record Redis took.
func (f *finals) remove(pf *pendingFinal) {
	f.mu.Lock()
	id := pf.rec.ExecutionID
	if f.pending[id] == pf {
		delete(f.pending, id)
		f.order = slices.DeleteFunc(f.order, func(o string) bool { return o == id })
		f.written++
	}
	f.mu.Unlock()
	pf.close()
}

// close frees the record's copy once no reader holds it.
func (pf *pendingFinal) close() {
	pf.readers.Lock()
	defer pf.readers.Unlock()
	pf.closed = true
	if pf.copy != nil {
		pf.copy.close()
		pf.copy = nil
	}
}

// readOutput reads the first n bytes of the output from the copy; the
// caller holds readers and found the record open.
func (pf *pendingFinal) readOutput(n int64) ([]byte, error) {
	out := make([]byte, min(n, pf.size))
	if len(out) == 0 {
		return nil, nil
	}
	if pf.copy == nil {
		return nil, fmt.Errorf("output of %s: %w", pf.rec.ExecutionID, errNoCopy)
	}
	if err := pf.copy.readAt(out, 0); err != nil {
		return nil, err
	}
	return out, nil
}
