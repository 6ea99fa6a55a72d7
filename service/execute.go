package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// finalWriteTimeout bounds how long the end of an execution (and a sync
// caller's reply) waits for its final record to be written: a try against
// a stalled server, or a few against a failing one. What Redis does not
// take by then is written in the background (finals), and GetExecution
// answers from it meanwhile.
const finalWriteTimeout = 2 * time.Second

// finalWriteRetry is the first pause between tries of a final write; it
// doubles until finalWriteTimeout is spent.
const finalWriteRetry = 100 * time.Millisecond

// redisTryTimeout bounds one Redis write of a running execution (a try of
// its final write, a record update, a flush of output). The Redis client
// gives up on a stalled server at the deadline, not when a context is
// cancelled, so this is also how long an abandoned write may still block
// (see Shutdown).
const redisTryTimeout = 2 * time.Second

// function is a registered function with what each of its executions
// needs worked out once: its environment, limits and timeout, the node's
// defaults applied.
type function struct {
	cfg *fluxpb.FunctionConfig
	// env is the environment but the per-execution FLUX_* values.
	env     []string
	limits  sandbox.Limits
	timeout time.Duration // 0: none
}

// fluxEnvKeys are set by the agent for each execution; a function's env
// cannot override them.
var fluxEnvKeys = []string{"FLUX_EXECUTION_ID", "FLUX_NODE_PRIVATE_IP", "FLUX_NODE_PUBLIC_IP"}

func (s *Service) newFunction(cfg *fluxpb.FunctionConfig) *function {
	fn := &function{cfg: cfg, timeout: time.Duration(cfg.GetTimeoutSeconds()) * time.Second}
	if fn.timeout == 0 {
		fn.timeout = s.opts.DefaultTimeout
	}
	mem := cfg.GetMemoryMb() << 20
	if mem == 0 {
		mem = s.opts.DefaultMemoryBytes
	}
	if mem > 0 {
		fn.limits.MemoryBytes = &mem
	}
	if mc := int64(cfg.GetCpuMillicores()); mc > 0 {
		fn.limits.CPUMillicores = &mc
	}
	env := baseEnv()
	maps.Copy(env, cfg.GetEnv())
	for _, k := range fluxEnvKeys {
		delete(env, k)
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		fn.env = append(fn.env, k+"="+env[k])
	}
	return fn
}

// execution is one accepted ExecuteFunction, from its admission to its
// final record. It owns what it acquires, and retire gives all of it back:
// its slot (or place in the queue), its span, its pinned code, its output
// stream and its process.
type execution struct {
	id     string
	fn     *function
	args   []string
	async  bool
	logger *slog.Logger
	// ctx carries the execution's span; abort cancels it, which makes
	// every Redis write of the execution give up.
	ctx   context.Context
	abort context.CancelFunc
	span  trace.Span
	slot  *waiter
	// claim receives the outcome of the claim of the id (the running
	// record), once; claimed reads it.
	claim    chan error
	claimErr error
	claimSet bool

	// Owned by the run goroutine; others read rec and resp once done is
	// closed.
	rec     Record
	resp    *fluxpb.ExecutionResponse
	code    Code
	out     *outputStream
	running bool // counted in the running gauge
	done    chan struct{}
	// feed hands the output to live tails (TailExecution).
	feed outputFeed

	mu        sync.Mutex
	proc      Process
	cancelled bool
	cancelMsg string
	cancelCh  chan struct{} // closed on the first cancel
	// stored is the running record as last written to Redis, which the
	// upkeep writes back if Redis loses it; nil before the claim and once
	// the final record is being written.
	stored []byte
}

// cancel asks the execution to end now: a queued one leaves the queue, a
// started one has its whole process tree killed.
func (e *execution) cancel(msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.cancelled {
		e.cancelled, e.cancelMsg = true, msg
		close(e.cancelCh)
	}
	if e.proc != nil {
		e.proc.Cancel()
	}
}

// cancelReason returns why the execution was cancelled, if it was.
func (e *execution) cancelReason() (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cancelMsg, e.cancelled
}

// claimed waits for the outcome of the claim; only the run goroutine
// calls it.
func (e *execution) claimed() error {
	if !e.claimSet {
		e.claimErr, e.claimSet = <-e.claim, true
	}
	return e.claimErr
}

// ExecuteFunction runs a function: sync calls return its output, async
// calls return once the running record exists.
func (s *Service) ExecuteFunction(ctx context.Context, req *fluxpb.ExecutionRequest) (*fluxpb.ExecutionResponse, error) {
	if err := validateExecution(req); err != nil {
		return nil, toStatus(err)
	}
	fn, err := s.function(ctx, req.GetFunctionName())
	if errors.Is(err, ErrNotRegistered) {
		return s.refuse(ctx, req, err)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	e, first, err := s.admit(ctx, req, fn)
	if errors.Is(err, ErrAtCapacity) {
		return s.refuse(ctx, req, err)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	// The process starts while its id is claimed; it runs only once the
	// claim holds.
	go s.run(e)
	if err := s.claim(trace.ContextWithSpan(ctx, e.span), e, first); err != nil {
		return nil, toStatus(err)
	}
	s.metrics.ExecutionStarted(ctx, fn.cfg.GetName(), e.async)
	if e.async {
		return &fluxpb.ExecutionResponse{}, nil
	}
	// A sync caller that goes away (Flux's HTTP deadline) takes its
	// execution with it.
	stop := context.AfterFunc(ctx, func() { e.cancel("the caller gave up: " + context.Cause(ctx).Error()) })
	defer stop()
	<-e.done
	return e.resp, nil
}

// admit gives an execution a slot (or a place in the queue) and registers
// it as active, unless its id is running or the agent is shutting down.
// It returns the execution's first record, for the claim.
func (s *Service) admit(ctx context.Context, req *fluxpb.ExecutionRequest, fn *function) (*execution, Record, error) {
	name, limit := fn.cfg.GetName(), int(fn.cfg.GetMaxConcurrency())
	var slot *waiter
	var err error
	if req.GetAsync() && fn.cfg.GetMaxConcurrencyBehavior() == BehaviorWait {
		slot, err = s.slots.enqueue(name, limit)
	} else {
		slot, err = s.slots.acquire(name, limit)
	}
	if err != nil {
		return nil, Record{}, err
	}
	e := &execution{
		id:       req.GetExecutionId(),
		fn:       fn,
		args:     req.GetArgs(),
		async:    req.GetAsync(),
		logger:   s.logger.With(telemetry.LogExecutionID, req.GetExecutionId(), telemetry.LogFunction, name),
		slot:     slot,
		claim:    make(chan error, 1),
		done:     make(chan struct{}),
		cancelCh: make(chan struct{}),
	}
	e.ctx, e.span = s.tracer.Start(context.WithoutCancel(ctx), telemetry.SpanExecution, trace.WithAttributes(
		telemetry.AttrFunction.String(name),
		telemetry.AttrExecutionID.String(e.id),
		telemetry.AttrAsync.Bool(e.async),
	))
	e.ctx, e.abort = context.WithCancel(e.ctx)
	e.rec = Record{
		ExecutionID:  e.id,
		AgentID:      s.opts.AgentID,
		FunctionName: name,
		Status:       StatusRunning,
		StartedAt:    time.Now().UTC(),
		Async:        e.async,
		Queued:       s.slots.waiting(slot),
		TimeoutMS:    fn.timeout.Milliseconds(),
	}
	if sc := e.span.SpanContext(); sc.HasTraceID() {
		e.rec.TraceID = sc.TraceID().String()
	}
	s.mu.Lock()
	switch {
	case s.draining:
		err = ErrShuttingDown
	case s.drained.Load():
		err = ErrDraining
	case s.active[e.id] != nil:
		err = fmt.Errorf("%w: %s is running", ErrDuplicateExecution, e.id)
	default:
		s.active[e.id] = e
	}
	s.mu.Unlock()
	if err != nil {
		s.slots.giveBack(slot)
		e.span.SetStatus(codes.Error, err.Error())
		e.span.End()
		e.abort()
		return nil, Record{}, err
	}
	return e, e.rec, nil
}

// claim writes the execution's running record, which claims its id, and
// hands the outcome to the run goroutine.
func (s *Service) claim(ctx context.Context, e *execution, rec Record) (err error) {
	ctx, span := s.tracer.Start(ctx, spanRecordClaim)
	defer func() {
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
		e.claim <- err
	}()
	data, err := json.Marshal(&rec)
	if err != nil {
		return fmt.Errorf("encode record %s: %w", e.id, err)
	}
	// A stalled Redis must not hold the caller until its deadline.
	try, cancel := context.WithTimeout(ctx, redisTryTimeout)
	defer cancel()
	created, err := s.state.createRecord(try, e.id, data, false)
	if err != nil && ctx.Err() == nil && try.Err() != nil {
		// The agent gave up on Redis, not the caller: Unavailable.
		err = fmt.Errorf("create record %s: Redis did not answer within %s", e.id, redisTryTimeout)
	}
	if err != nil {
		s.metrics.RedisError(ctx, "create_record")
		// The record may be written all the same: the answer was lost, or
		// (in a Cluster) only the running set's node failed. The caller is
		// told the execution did not start, and so will the record be.
		s.queueSettle(e.id, reasonClaimFailed, claimSettleDelay)
		return err
	}
	if !created {
		return fmt.Errorf("%w: %s", ErrDuplicateExecution, e.id)
	}
	e.mu.Lock()
	e.stored = data
	e.mu.Unlock()
	return nil
}

// refuse answers an execution that cannot start. Flux ignores the error of
// an async response, so an async one also leaves a failed record, unless
// Flux retries the same id (retriedByFlux).
func (s *Service) refuse(ctx context.Context, req *fluxpb.ExecutionRequest, cause error) (*fluxpb.ExecutionResponse, error) {
	if req.GetAsync() && !s.retriedByFlux(req, cause) {
		now := time.Now().UTC()
		data, err := json.Marshal(&Record{
			ExecutionID:  req.GetExecutionId(),
			AgentID:      s.opts.AgentID,
			FunctionName: req.GetFunctionName(),
			Status:       StatusFailed,
			Error:        cause.Error(),
			StartedAt:    now,
			StatusAt:     &now,
			Async:        true,
		})
		if err != nil {
			return nil, toStatus(err)
		}
		created, err := s.state.createRecord(ctx, req.GetExecutionId(), data, true)
		if err != nil {
			s.metrics.RedisError(ctx, "create_record")
			return nil, toStatus(err)
		}
		if !created {
			return nil, toStatus(fmt.Errorf("%w: %s", ErrDuplicateExecution, req.GetExecutionId()))
		}
	}
	s.logger.InfoContext(ctx, "execution refused", telemetry.LogExecutionID, req.GetExecutionId(),
		telemetry.LogFunction, req.GetFunctionName(), "async", req.GetAsync(), "reason", cause)
	return &fluxpb.ExecutionResponse{Error: cause.Error()}, nil
}

// run is the goroutine that owns an admitted execution: it waits for its
// slot if it is queued, launches it, and retires it.
//
// A sync caller waits for the process: it starts while the id is claimed.
// An async caller waits for the claim only: the process starts after it,
// so as not to compete with it for the CPU.
func (s *Service) run(e *execution) {
	defer s.retire(e)
	if e.async && e.claimed() != nil {
		return // the id is not ours: no record to write
	}
	if e.rec.Queued && !s.waitForSlot(e) {
		s.finish(e, nil, nil)
		return
	}
	s.launch(e)
}

// waitForSlot waits in the queue until the execution gets a slot (true) or
// is cancelled there (false).
func (s *Service) waitForSlot(e *execution) bool {
	_, span := s.tracer.Start(e.ctx, spanQueueWait)
	defer span.End()
	name := e.fn.cfg.GetName()
	s.metrics.QueuedAdd(e.ctx, name, 1)
	defer s.metrics.QueuedAdd(e.ctx, name, -1)
	select {
	case <-e.slot.ready:
		return true
	case <-e.cancelCh:
		// The slot may have come at the same moment: then it runs, and
		// launch sees the cancel before the function's first instruction.
		return !s.slots.leave(e.slot)
	}
}

// launch starts the process held, lets it run once its id is claimed (if
// it is not already), waits for it and finishes the execution.
func (s *Service) launch(e *execution) {
	dequeued := e.rec.Queued
	if dequeued {
		e.rec.Queued = false
		e.rec.QueuedMS = time.Since(e.rec.StartedAt).Milliseconds()
		e.span.SetAttributes(telemetry.AttrQueuedMS.Int64(e.rec.QueuedMS))
	}
	proc, startErr := s.start(e)
	if err := e.claimed(); err != nil {
		// The id is another execution's: nothing of this one is stored.
		// The process is held, so it dies without running the function.
		if e.out != nil {
			e.out.releaseWriters()
		}
		if proc != nil {
			proc.Cancel()
			<-proc.Done()
		}
		return
	}
	if e.out != nil {
		e.out.open()
	}
	if startErr != nil {
		s.finish(e, nil, startErr)
		return
	}
	s.metrics.RunningAdd(e.ctx, e.fn.cfg.GetName(), 1)
	e.running = true
	if err := s.resume(e, proc); err != nil {
		proc.Cancel()
		<-proc.Done()
		s.finish(e, nil, fmt.Errorf("start: %w", err))
		return
	}
	if dequeued {
		// The process runs meanwhile; the final record comes after this
		// one, from this goroutine.
		ctx, span := s.tracer.Start(e.ctx, spanRecordUpdate)
		ctx, cancel := context.WithTimeout(ctx, redisTryTimeout)
		data, err := json.Marshal(&e.rec)
		if err == nil {
			e.mu.Lock()
			e.stored = data
			e.mu.Unlock()
			err = s.state.updateRecord(ctx, e.id, data)
		}
		cancel()
		if err != nil {
			s.metrics.RedisError(ctx, "update_record")
			span.SetStatus(codes.Error, err.Error())
			e.logger.WarnContext(ctx, "record not updated", "err", err)
		}
		span.End()
	}
	_, wait := s.tracer.Start(e.ctx, telemetry.SpanSandboxWait)
	<-proc.Done()
	res := proc.Result()
	wait.SetAttributes(telemetry.AttrExitCode.Int(res.ExitCode), telemetry.AttrOOMKilled.Bool(res.OOMKilled),
		telemetry.AttrTimedOut.Bool(res.TimedOut), telemetry.AttrCancelled.Bool(res.Cancelled))
	wait.End()
	s.finish(e, &res, nil)
}

// start pins the function's code and starts its process, held.
func (s *Service) start(e *execution) (Process, error) {
	ctx, span := s.tracer.Start(e.ctx, telemetry.SpanSandboxStart)
	defer span.End()
	code, err := s.code.Checkout(e.fn.cfg.GetName(), e.fn.cfg.GetHandler())
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		return nil, err
	}
	e.code = code
	e.rec.CodeVersion = code.Version
	out := newOutputStream(e.ctx, s.opts.OutputLimit, s.replyBudgetFor(e), e.logger, s.opts.SpoolDir, s.outputWriter(e))
	out.tap = &e.feed
	e.mu.Lock() // Shutdown reaches it through abandon
	e.out = out
	e.mu.Unlock()
	proc, err := s.sandbox.Start(ctx, sandbox.Spec{
		ID:        e.id,
		Path:      code.Path,
		Args:      e.args,
		Dir:       code.Dir,
		Env:       s.environment(e),
		Limits:    e.fn.limits,
		Timeout:   e.fn.timeout,
		KillGrace: s.opts.KillGrace,
		Output:    out,
	})
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		return nil, fmt.Errorf("start: %w", err)
	}
	span.SetAttributes(telemetry.AttrPID.Int(proc.Pid()))
	return proc, nil
}

// resume lets the held process run, unless the execution was cancelled
// meanwhile: then it is killed before the function's first instruction.
func (s *Service) resume(e *execution, proc Process) error {
	if e.logger.Enabled(e.ctx, slog.LevelDebug) {
		e.logger.DebugContext(e.ctx, "execution started", "pid", proc.Pid(), "version", e.code.Version)
	}
	// Under mu, so that a cancel either comes before (and the process
	// never runs) or finds it to kill.
	e.mu.Lock()
	defer e.mu.Unlock()
	e.proc = proc
	if e.cancelled {
		proc.Cancel()
		return nil
	}
	return proc.Resume()
}

// abandon is Shutdown's last word on an execution it could not wait for:
// its Redis writes give up and its output no longer waits for Redis, so
// that it ends at once. What was not written is settled at the next start.
func (e *execution) abandon() {
	e.mu.Lock()
	out := e.out
	e.mu.Unlock()
	if out != nil {
		out.releaseWriters()
	}
	e.abort()
}

// checkOutput has the execution's output writer check that Redis still
// holds what it wrote, and write again what it lost.
func (e *execution) checkOutput() {
	e.mu.Lock()
	out := e.out
	e.mu.Unlock()
	if out != nil {
		out.checkRedis()
	}
}

// replyBudgetFor is the budget a sync execution keeps its reply under;
// nil for an async one, which keeps none.
func (s *Service) replyBudgetFor(e *execution) *byteBudget {
	if e.async {
		return nil
	}
	return s.syncOutput
}

// outputWriter stores an execution's live output, each write in a span.
func (s *Service) outputWriter(e *execution) func(context.Context, int64, []byte) error {
	return func(ctx context.Context, offset int64, chunk []byte) error {
		ctx, span := s.tracer.Start(ctx, spanOutputFlush, trace.WithAttributes(attrFlushBytes.Int(len(chunk))))
		defer span.End()
		err := s.state.writeOutput(ctx, e.id, offset, chunk)
		if err != nil {
			s.metrics.RedisError(ctx, "write_output")
			span.SetStatus(codes.Error, err.Error())
		} else {
			e.feed.flushed(offset + int64(len(chunk)))
		}
		return err
	}
}

// finish turns how an execution ended into its final record, response,
// span status and metrics. res is nil when no process ran; err says why.
func (s *Service) finish(e *execution, res *sandbox.Result, err error) {
	var rest []outputPiece
	var out outputStats
	if e.out != nil {
		rest = e.out.stop()
		out = e.out.stats()
	}
	e.mu.Lock()
	e.stored = nil // from now on the final record is what Redis must get
	e.mu.Unlock()
	now := time.Now().UTC()
	rec := &e.rec
	rec.StatusAt = &now
	rec.Queued = false
	rec.OutputBytes = out.total
	rec.OutputTruncated = out.truncated
	cancelMsg, cancelled := e.cancelReason()
	switch {
	case err != nil:
		rec.Status, rec.Error = StatusFailed, err.Error()
	case res == nil && cancelled:
		rec.Status, rec.Error = StatusCancelled, cancelMsg
	case res == nil:
		rec.Status, rec.Error = StatusFailed, "the execution did not start"
	default:
		rec.ExitCode = &res.ExitCode
		rec.Signal = res.Signal
		rec.OOMKilled = res.OOMKilled
		rec.TimedOut = res.TimedOut
		rec.PeakMemoryBytes = res.PeakMemoryBytes
		rec.CPUTimeMS = res.CPUTime.Milliseconds()
		rec.DurationMS = res.WallTime.Milliseconds()
		rec.MemoryLimitBytes = res.MemoryLimitBytes
		rec.NetworkBlocked = res.Blocked
		rec.Status, rec.Error = outcome(res, e.fn.timeout, cancelMsg)
		if res.OutputErr != nil {
			// The stream never fails, so the end of the output was
			// abandoned (a process escaped the group without a cgroup to
			// hold it).
			rec.OutputTruncated = true
			e.logger.WarnContext(e.ctx, "output cut short", "err", res.OutputErr)
		}
	}
	s.writeFinal(e, rest)
	if !e.async {
		var output []byte
		if e.out != nil {
			output = e.out.replyOutput()
		}
		e.resp = &fluxpb.ExecutionResponse{Output: output, Error: rec.Error, DurationMs: rec.DurationMS}
	}

	e.span.SetAttributes(
		telemetry.AttrStatus.String(rec.Status),
		telemetry.AttrOutputBytes.Int64(rec.OutputBytes),
		telemetry.AttrOutputTruncated.Bool(rec.OutputTruncated),
		telemetry.AttrOOMKilled.Bool(rec.OOMKilled),
		telemetry.AttrTimedOut.Bool(rec.TimedOut),
		telemetry.AttrCancelled.Bool(rec.Status == StatusCancelled),
		telemetry.AttrPeakMemoryBytes.Int64(int64(rec.PeakMemoryBytes)),
		telemetry.AttrCPUTimeMS.Int64(rec.CPUTimeMS),
	)
	if rec.ExitCode != nil {
		e.span.SetAttributes(telemetry.AttrExitCode.Int(*rec.ExitCode))
	}
	if res != nil && res.Blocked > 0 {
		// What the network policy refused: a count, and an event for each
		// of the first few, with where it went.
		e.span.SetAttributes(telemetry.AttrNetworkBlocked.Int(res.Blocked))
		for _, b := range res.BlockedSample {
			e.span.AddEvent(telemetry.EventNetworkBlocked, trace.WithAttributes(
				telemetry.AttrNetworkDestination.String(b.Destination.String()),
				telemetry.AttrNetworkProtocol.String(b.Protocol)))
		}
		e.logger.WarnContext(e.ctx, "the network policy refused connections of the function", "count", res.Blocked)
	}
	if rec.Status != StatusSuccess {
		e.span.SetStatus(codes.Error, rec.Error)
	}
	s.metrics.ExecutionFinished(e.ctx, e.fn.cfg.GetName(), telemetry.ExecutionOutcome{
		Status:         rec.Status,
		Duration:       time.Duration(rec.DurationMS) * time.Millisecond,
		OutputBytes:    rec.OutputBytes,
		OOMKilled:      rec.OOMKilled,
		TimedOut:       rec.TimedOut,
		Cancelled:      rec.Status == StatusCancelled,
		NetworkBlocked: int64(rec.NetworkBlocked),
	})
	level := slog.LevelInfo
	if rec.Status == StatusFailed {
		level = slog.LevelWarn
	}
	e.logger.Log(e.ctx, level, "execution finished", "status", rec.Status, "err", rec.Error,
		"duration_ms", rec.DurationMS, "output_bytes", rec.OutputBytes, "async", e.async)
}

// writeFinal stores the rest of the output and the final record, retrying
// through a short Redis outage for finalWriteTimeout: a record left
// "running" would mislead Flux. What Redis has not taken by then, or once
// Shutdown gave the execution up, is handed to the background writer
// (finals), with the agent's copy of the output; it stays in the running
// set until it is written. If Redis lost output written before (it
// restarted empty), that output is written again from the copy first.
func (s *Service) writeFinal(e *execution, rest []outputPiece) {
	ctx, span := s.tracer.Start(e.ctx, spanRecordFinal)
	defer span.End()
	var written int64
	if e.out != nil {
		written = e.out.writtenLen()
	}
	deadline := time.Now().Add(finalWriteTimeout)
	pause := finalWriteRetry
	var unlisted bool
	var err error
	for rewrites := 0; ; {
		tryEnd := time.Now().Add(redisTryTimeout)
		if tryEnd.After(deadline) {
			tryEnd = deadline
		}
		try, cancelTry := context.WithDeadline(ctx, tryEnd)
		unlisted, err = s.state.finishRecord(try, &e.rec, rest, written)
		cancelTry()
		var gap *outputGapError
		if errors.As(err, &gap) && e.out != nil && rewrites < maxRewrites {
			rewrites++
			e.logger.WarnContext(ctx, "Redis lost output of the execution; writing it again", "have", gap.have, "written", written)
			if err = e.out.rewrite(gap.have, written); err == nil {
				continue
			}
		}
		if err == nil {
			return
		}
		s.metrics.RedisError(ctx, "finish_record")
		if ctx.Err() != nil || time.Until(deadline) < pause {
			break
		}
		retry := time.NewTimer(pause)
		select {
		case <-ctx.Done():
		case <-retry.C:
		}
		retry.Stop()
		pause *= 2
	}
	span.SetStatus(codes.Error, err.Error())
	e.logger.DebugContext(ctx, "final record not written yet; retrying in the background", "status", e.rec.Status, "err", err)
	pf := &pendingFinal{rec: e.rec, written: written, size: written, unlisted: unlisted}
	for _, p := range rest {
		pf.size = max(pf.size, p.offset+int64(len(p.data)))
	}
	if e.out != nil {
		copied, cerr := e.out.takeCopy(rest)
		if cerr != nil {
			e.logger.ErrorContext(ctx, "no local copy of the output: what Redis lacks of it is lost", "err", cerr)
			pf.size = written
		}
		pf.copy = copied
	}
	s.finals.add(ctx, pf, err)
}

// retire gives back everything the execution holds, once it is over.
func (s *Service) retire(e *execution) {
	if e.out != nil {
		e.out.free()
	}
	if e.code.Release != nil {
		e.code.Release()
	}
	if e.running {
		s.metrics.RunningAdd(e.ctx, e.fn.cfg.GetName(), -1)
	}
	s.slots.giveBack(e.slot)
	e.span.End()
	e.abort()
	s.mu.Lock()
	delete(s.active, e.id)
	if s.draining && len(s.active) == 0 {
		close(s.idle)
	}
	s.mu.Unlock()
	close(e.done)
}

// outcome names the status and error of a process that ran. The sandbox
// words what it measured (OOM against the limit it applied, signals, exit
// codes); the service words what it decided (timeouts, cancels).
func outcome(res *sandbox.Result, timeout time.Duration, cancelMsg string) (status, errText string) {
	switch {
	case res.Cancelled:
		if cancelMsg == "" {
			cancelMsg = "cancelled"
		}
		return StatusCancelled, cancelMsg
	case res.TimedOut && !res.OOMKilled:
		return StatusFailed, "execution timed out after " + formatTimeout(timeout)
	}
	if err := res.Err(); err != nil {
		return StatusFailed, err.Error()
	}
	return StatusSuccess, ""
}

// formatTimeout writes a timeout as Flux's users know it: whole seconds
// as "30s".
func formatTimeout(d time.Duration) string {
	if d%time.Second == 0 {
		return fmt.Sprintf("%ds", d/time.Second)
	}
	return d.String()
}

// environment is all a function sees: a minimal base, its own env, and
// the FLUX_* values, which its env cannot override. Nothing comes from the
// agent's own environment.
func (s *Service) environment(e *execution) []string {
	env := make([]string, 0, len(e.fn.env)+len(fluxEnvKeys))
	env = append(env, e.fn.env...)
	for i, v := range []string{e.id, s.opts.IPs.PrivateIP(), s.opts.IPs.PublicIP()} {
		env = append(env, fluxEnvKeys[i]+"="+v)
	}
	return env
}

// CancelExecution kills a running execution's whole tree, or takes a queued
// one out of the queue, and returns once its final record is written.
func (s *Service) CancelExecution(ctx context.Context, req *fluxpb.CancelExecutionRequest) (*fluxpb.CancelExecutionResponse, error) {
	id := req.GetExecutionId()
	if id == "" {
		return &fluxpb.CancelExecutionResponse{Message: "execution_id is empty"}, nil
	}
	s.mu.Lock()
	e := s.active[id]
	s.mu.Unlock()
	if e == nil {
		return &fluxpb.CancelExecutionResponse{Message: s.notRunning(ctx, id)}, nil
	}
	e.cancel("cancelled by request")
	select {
	case <-e.done:
	case <-ctx.Done():
		return &fluxpb.CancelExecutionResponse{Success: true, Message: "execution " + id + " is being cancelled"}, nil
	}
	switch e.rec.Status {
	case StatusCancelled:
	case StatusRunning:
		return &fluxpb.CancelExecutionResponse{Message: "execution " + id + " did not start"}, nil
	default:
		return &fluxpb.CancelExecutionResponse{Message: fmt.Sprintf("execution %s finished before it could be cancelled (status %s)", id, e.rec.Status)}, nil
	}
	return &fluxpb.CancelExecutionResponse{Success: true, Message: "execution " + id + " cancelled"}, nil
}

// notRunning explains why there is nothing to cancel.
func (s *Service) notRunning(ctx context.Context, id string) string {
	if !executionIDPattern.MatchString(id) {
		return fmt.Sprintf("execution %q is not running on this agent", id)
	}
	if pf := s.finals.get(id); pf != nil {
		return fmt.Sprintf("execution %s already finished (status %s)", id, pf.rec.Status)
	}
	if rec, err := s.state.record(ctx, id); err == nil && rec != nil && rec.Final() {
		return fmt.Sprintf("execution %s already finished (status %s)", id, rec.Status)
	}
	return fmt.Sprintf("execution %s is not running on this agent", id)
}
