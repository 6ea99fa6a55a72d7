package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// outputFlushInterval paces writes of live output to Redis: new output
// reaches Redis within this interval plus one round trip, and a chatty
// function costs at most one write per interval, unless it fills a whole
// buffer sooner.
const outputFlushInterval = 100 * time.Millisecond

// outputChunkBytes is the size of each of the two buffers that carry an
// execution's output to Redis: one fills while the other is written. A
// function that writes faster than Redis takes its output waits on its full
// pipe, so an execution holds at most two of them (the pipe's own 64 KiB
// matches).
const outputChunkBytes = 64 << 10

// outputRetryInterval paces retries while Redis refuses writes.
const outputRetryInterval = time.Second

// rewriteChunkBytes is how much output is written at once when Redis lost
// some and it is written again from the agent's copy.
const rewriteChunkBytes = 256 << 10

// maxRewrites bounds how often one write finds Redis lost output again
// while it writes it back (it keeps restarting empty): the write then
// fails and is retried like any other.
const maxRewrites = 3

// chunkPool recycles the output buffers between executions.
var chunkPool = sync.Pool{New: func() any {
	b := make([]byte, 0, outputChunkBytes)
	return &b
}}

// outputPiece is output bytes and where they go in the stored output.
type outputPiece struct {
	offset int64
	data   []byte
}

// outputStats is what an execution's output came to.
type outputStats struct {
	total     int64 // bytes the function wrote
	truncated bool  // some were dropped (limit, or the agent stopping)
}

// outputStream receives a function's stdout and stderr (merged into one
// stream by the sandbox) and carries it to Redis while the function runs.
// It keeps at most limit bytes; beyond, the output is cut with a marker and
// the function keeps running. Between the pipe and Redis the output sits in
// two buffers of outputChunkBytes: when both are full, Write waits (the
// function then waits on its pipe) rather than piling output up in memory.
//
// A sync execution also keeps its output for the reply, as long as the
// node's reply budget has room: past it the reply is cut with a marker
// while the output still goes, whole, to Redis.
//
// What goes to Redis is also kept by the agent until the execution's final
// record is written: the reply holds its start, a spool file on local disk
// the rest. Writes past offset 0 are checked (see state.writeOutput): when
// Redis lost output (it restarted empty, a replica took over), the stream
// writes it again from that copy, from where Redis stops, so the output in
// Redis never has a gap.
type outputStream struct {
	limit int64
	// budget bounds what all sync executions keep for their replies; nil
	// keeps no reply (async).
	budget *byteBudget
	// write stores a chunk at its offset in Redis; it is called by the
	// flush goroutine only.
	write  func(ctx context.Context, offset int64, chunk []byte) error
	ctx    context.Context
	logger *slog.Logger
	// tap, when set, sees every byte the stream keeps, in order, as it
	// comes (mu held): live tails read it before Redis has it.
	tap *outputFeed
	// spoolDir is where the spool is made ("" = the system's temp dir).
	spoolDir string
	// spool holds the output past the reply, made at its first chunk; the
	// flush goroutine owns it while it runs, then the execution's run
	// goroutine, which may hand it on (takeCopy).
	spool *spool
	// noCopy says why the agent's copy of the output is incomplete (the
	// disk failed); Redis's loss can then not be made good.
	noCopy error

	mu        sync.Mutex
	total     int64 // bytes the function wrote
	kept      int64 // of them, kept: at most limit
	truncated bool
	reply     []byte // sync: the output so far, while keeping
	keeping   bool
	reserved  int64 // of budget, for reply's capacity
	replyCut  bool
	sent      int64  // the output before this offset was handed to the flusher
	filling   []byte // takes new output past the reply
	spare     []byte // an empty buffer; nil while it is being written
	blocked   bool   // a Write waits for a buffer
	released  bool   // Write never waits again
	opened    bool   // the output may go to Redis
	stopped   bool
	lost      int64 // bytes dropped once released
	flushing  bool  // the flush goroutine runs
	unwritten *outputPiece
	written   int64     // Redis holds the output before this offset, as far as the agent knows
	verify    bool      // check that Redis still holds what was written
	pooled    []*[]byte // buffers to give back to chunkPool

	// Made at the first output: most executions print little or nothing.
	ready   chan struct{} // there is output to send
	room    chan struct{} // a buffer came back
	urge    chan struct{} // a Write waits: flush now
	release chan struct{} // closed by releaseWriters
	quit    chan struct{}
	done    chan struct{}
}

func newOutputStream(ctx context.Context, limit int64, budget *byteBudget, logger *slog.Logger, spoolDir string,
	write func(ctx context.Context, offset int64, chunk []byte) error) *outputStream {
	return &outputStream{limit: limit, budget: budget, keeping: budget != nil, write: write, ctx: ctx,
		logger: logger, spoolDir: spoolDir}
}

// Write implements io.Writer for the sandbox. It never fails: output past
// the limit is dropped.
func (o *outputStream) Write(p []byte) (int, error) {
	n := len(p)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.total += int64(n)
	take := min(int64(len(p)), o.limit-o.kept)
	o.kept += take
	o.add(p[:take])
	if int64(len(p)) > take && !o.truncated {
		o.truncated = true
		o.add(fmt.Appendf(nil, "\n[flux-agent: output truncated: it exceeded the %d-byte output limit]\n", o.limit))
	}
	return n, nil
}

// add queues b for Redis (and the reply), waiting for a buffer when both
// are full; mu held, released while waiting.
func (o *outputStream) add(b []byte) {
	if len(b) == 0 {
		return
	}
	if o.ready == nil {
		o.ready, o.room, o.urge = make(chan struct{}, 1), make(chan struct{}, 1), make(chan struct{}, 1)
		o.release, o.quit, o.done = make(chan struct{}), make(chan struct{}), make(chan struct{})
		if o.released {
			close(o.release)
		}
	}
	o.startFlushing()
	if o.keeping && o.keep(b) {
		o.tapped(b)
		signal(o.ready)
		return
	}
	for len(b) > 0 {
		if o.filling == nil {
			o.filling, o.spare = o.spare, nil
			if o.filling == nil {
				buf := chunkPool.Get().(*[]byte)
				o.pooled = append(o.pooled, buf)
				o.filling = (*buf)[:0]
			}
		}
		if room := cap(o.filling) - len(o.filling); room > 0 {
			n := min(room, len(b))
			o.filling = append(o.filling, b[:n]...)
			o.tapped(b[:n])
			b = b[n:]
			signal(o.ready)
			continue
		}
		if o.released || o.stopped {
			o.lost += int64(len(b))
			o.truncated = true
			return
		}
		o.blocked = true
		signal(o.urge)
		o.mu.Unlock()
		select {
		case <-o.room:
		case <-o.release:
		}
		o.mu.Lock()
	}
}

// tapped hands kept bytes to the tap, if any; mu held.
func (o *outputStream) tapped(b []byte) {
	if o.tap != nil {
		o.tap.publish(b)
	}
}

// open lets the output go to Redis: until the execution's id is claimed
// it is not the execution's to write (the id may be another's).
func (o *outputStream) open() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.opened = true
	o.startFlushing()
}

// startFlushing starts the flush goroutine once there is output and the
// stream is open; mu held.
func (o *outputStream) startFlushing() {
	if o.opened && o.ready != nil && !o.flushing && !o.stopped {
		o.flushing = true
		go o.flush()
	}
}

// keep adds b to the reply if the node's budget has room for it; once it
// has not, the reply ends here.
func (o *outputStream) keep(b []byte) bool {
	if need := len(o.reply) + len(b); need > cap(o.reply) {
		grown := max(need, min(2*cap(o.reply), int(o.limit)+256))
		if !o.budget.tryAcquire(int64(grown - cap(o.reply))) {
			o.keeping, o.replyCut = false, true
			return false
		}
		o.reserved += int64(grown - cap(o.reply))
		r := make([]byte, len(o.reply), grown)
		copy(r, o.reply)
		o.reply = r
	}
	o.reply = append(o.reply, b...)
	return true
}

// next hands the flusher the oldest output not yet handed out: the rest of
// the reply, then the filled buffer. buffer says the chunk must come back
// through recycle.
func (o *outputStream) next() (p outputPiece, buffer bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.nextLocked()
}

func (o *outputStream) nextLocked() (p outputPiece, buffer bool) {
	if o.sent < int64(len(o.reply)) {
		p = outputPiece{offset: o.sent, data: o.reply[o.sent:]}
		o.sent = int64(len(o.reply))
		return p, false
	}
	if len(o.filling) == 0 {
		return p, false
	}
	p = outputPiece{offset: o.sent, data: o.filling}
	o.sent += int64(len(o.filling))
	o.filling, o.spare = o.spare, nil
	return p, true
}

// recycle takes back a buffer whose bytes are in Redis.
func (o *outputStream) recycle(b []byte) {
	o.mu.Lock()
	if o.filling == nil {
		o.filling = b[:0]
	} else {
		o.spare = b[:0]
	}
	o.blocked = false
	o.mu.Unlock()
	signal(o.room)
}

// pressing says a writer waits or a buffer is full: flush without pacing.
func (o *outputStream) pressing() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.blocked || (o.filling != nil && len(o.filling) == cap(o.filling))
}

// flush is the goroutine that writes output to Redis as it comes, one
// chunk at a time, retrying a chunk Redis refused; stop ends it.
func (o *outputStream) flush() {
	defer close(o.done)
	pace := time.NewTimer(outputFlushInterval)
	defer pace.Stop()
	failing := false
	for {
		select {
		case <-o.quit:
			return
		case <-o.ready:
		}
		p, buffer := o.next()
		if buffer {
			o.copyToSpool(p)
		}
		if len(p.data) == 0 {
			p.offset = o.toVerify() // nothing new: check what is there, if asked to
		}
		for len(p.data) > 0 || p.offset > 0 {
			err := o.put(p)
			if err == nil {
				break
			}
			if !failing {
				o.logger.WarnContext(o.ctx, "live output not written; retrying every second", "err", err)
				failing = true
			}
			pace.Reset(outputRetryInterval)
			select {
			case <-o.quit:
				if len(p.data) > 0 {
					o.mu.Lock()
					o.unwritten = &p
					o.mu.Unlock()
				}
				return
			case <-pace.C:
			}
		}
		if failing && len(p.data) > 0 {
			o.logger.InfoContext(o.ctx, "live output written again")
			failing = false
		}
		if buffer {
			o.recycle(p.data)
		}
		if o.pressing() {
			signal(o.ready)
			continue
		}
		pace.Reset(outputFlushInterval)
		select {
		case <-o.quit:
			return
		case <-pace.C:
		case <-o.urge:
		}
	}
}

// put writes p to Redis. If Redis lost output before p, what it lacks is
// written again from the agent's copy first.
func (o *outputStream) put(p outputPiece) error {
	for range maxRewrites {
		ctx, cancel := context.WithTimeout(o.ctx, redisTryTimeout)
		err := o.write(ctx, p.offset, p.data)
		cancel()
		var gap *outputGapError
		if !errors.As(err, &gap) {
			if err == nil {
				o.mu.Lock()
				o.written = max(o.written, p.offset+int64(len(p.data)))
				o.mu.Unlock()
			}
			return err
		}
		o.logger.WarnContext(o.ctx, "Redis lost output of the execution; writing it again", "have", gap.have, "offset", p.offset)
		if err := o.rewrite(gap.have, p.offset); err != nil {
			return err
		}
	}
	return fmt.Errorf("output at %d: Redis kept losing it", p.offset)
}

// rewrite writes output [from, to) again from the agent's copy, where
// Redis lost it.
func (o *outputStream) rewrite(from, to int64) error {
	buf := make([]byte, min(to-from, rewriteChunkBytes))
	for rewrites := 0; from < to; {
		chunk := buf[:min(int64(len(buf)), to-from)]
		if err := o.readCopy(chunk, from); err != nil {
			return fmt.Errorf("write lost output again: %w", err)
		}
		ctx, cancel := context.WithTimeout(o.ctx, redisTryTimeout)
		err := o.write(ctx, from, chunk)
		cancel()
		var gap *outputGapError
		switch {
		case errors.As(err, &gap) && rewrites < maxRewrites:
			rewrites++
			from = gap.have // Redis lost it again
		case err != nil:
			return err
		default:
			from += int64(len(chunk))
		}
	}
	return nil
}

// readCopy fills p with the output at off from the agent's copy: the
// reply, then the spool.
func (o *outputStream) readCopy(p []byte, off int64) error {
	o.mu.Lock()
	n := 0
	if off < int64(len(o.reply)) {
		n = copy(p, o.reply[off:])
	}
	sp, noCopy := o.spool, o.noCopy
	o.mu.Unlock()
	if n == len(p) {
		return nil
	}
	if sp == nil || noCopy != nil {
		return errors.Join(errNoCopy, noCopy)
	}
	return sp.readAt(p[n:], off+int64(n))
}

// copyToSpool keeps a chunk headed for Redis in the spool. A disk that
// fails leaves the copy incomplete, which matters only if Redis loses the
// output too; it is logged once.
func (o *outputStream) copyToSpool(p outputPiece) {
	if o.noCopy != nil {
		return
	}
	var err error
	if o.spool == nil {
		var sp *spool
		if sp, err = openSpool(o.spoolDir); err == nil {
			o.mu.Lock()
			o.spool = sp
			o.mu.Unlock()
		}
	}
	if err == nil {
		err = o.spool.writeAt(p.data, p.offset)
	}
	if err != nil {
		o.logger.WarnContext(o.ctx, "no local copy of the output: it cannot be written again if Redis loses it", "err", err)
		o.mu.Lock()
		o.noCopy = err
		o.mu.Unlock()
	}
}

// checkRedis asks the flush goroutine to check that Redis still holds the
// output written so far, and to write again what it lost: the agent saw
// Redis restart or fail over.
func (o *outputStream) checkRedis() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.written > 0 && o.flushing && !o.stopped {
		o.verify = true
		signal(o.ready)
	}
}

// toVerify returns the offset to check Redis at (what was written), or 0
// when no check was asked for.
func (o *outputStream) toVerify() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.verify {
		return 0
	}
	o.verify = false
	return o.written
}

// releaseWriters makes Write stop waiting for Redis: output that finds
// both buffers full is dropped. The agent does it when it must end an
// execution within a bound (shutdown) whatever Redis does.
func (o *outputStream) releaseWriters() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.released {
		o.released = true
		if o.release != nil {
			close(o.release)
		}
	}
}

// stop ends the flush goroutine after the write under way and returns the
// output not yet in Redis, in order, for the final write. The sandbox must
// be done writing.
func (o *outputStream) stop() []outputPiece {
	o.mu.Lock()
	o.stopped = true
	flushing := o.flushing
	o.mu.Unlock()
	if flushing {
		close(o.quit)
		<-o.done
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	var rest []outputPiece
	if o.unwritten != nil {
		rest = append(rest, *o.unwritten)
	}
	if p, _ := o.nextLocked(); len(p.data) > 0 {
		rest = append(rest, p)
	}
	if p, _ := o.nextLocked(); len(p.data) > 0 {
		rest = append(rest, p)
	}
	if o.lost > 0 {
		marker := fmt.Appendf(nil, "\n[flux-agent: %d bytes of output lost: the agent stopped before Redis took them]\n", o.lost)
		rest = append(rest, outputPiece{offset: o.sent, data: marker})
	}
	return rest
}

// writtenLen is how much of the output went to Redis before the final
// write, as far as the agent knows.
func (o *outputStream) writtenLen() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.written
}

// takeCopy hands over the agent's copy of the whole output (what stop
// returned included) as a spool, once the stream is stopped: the final
// record waits for Redis longer than the execution. It is nil when there
// is no output; an error says the copy is incomplete.
func (o *outputStream) takeCopy(rest []outputPiece) (*spool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.noCopy != nil {
		return nil, o.noCopy
	}
	if len(o.reply) == 0 && len(rest) == 0 && o.spool == nil {
		return nil, nil
	}
	sp := o.spool
	if sp == nil {
		var err error
		if sp, err = openSpool(o.spoolDir); err != nil {
			return nil, err
		}
	}
	o.spool = nil
	err := sp.writeAt(o.reply, 0)
	for _, p := range rest {
		if err == nil {
			err = sp.writeAt(p.data, p.offset)
		}
	}
	if err != nil {
		return nil, errors.Join(err, sp.close())
	}
	return sp, nil
}

// stats says what the output came to.
func (o *outputStream) stats() outputStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return outputStats{total: o.total, truncated: o.truncated}
}

// replyOutput is the output of a sync execution for its reply: all of it,
// or what the node's reply budget had room for and a marker.
func (o *outputStream) replyOutput() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.replyCut {
		return o.reply
	}
	return fmt.Appendf(o.reply[:len(o.reply):len(o.reply)],
		"\n[flux-agent: reply cut after %d bytes: the node's memory for sync replies is in use; GetExecution has the whole output]\n", len(o.reply))
}

// free gives back the buffers and the reply's share of the budget; the
// stream and what stop and replyOutput returned are not used after it.
func (o *outputStream) free() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, b := range o.pooled {
		chunkPool.Put(b)
	}
	o.pooled, o.filling, o.spare = nil, nil, nil
	if o.spool != nil {
		if err := o.spool.close(); err != nil {
			o.logger.WarnContext(o.ctx, "output spool not removed", "err", err)
		}
		o.spool = nil
	}
	if o.reserved > 0 {
		o.budget.release(o.reserved)
		o.reserved = 0
	}
}

// signal wakes whoever waits on c (a channel of capacity 1) without
// blocking.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
