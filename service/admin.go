package service

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// ErrDraining refuses new executions while the agent drains. Its text
// contains "at capacity", the refusal Flux handles best: it answers 503 for
// functions with behaviour exit and retries every 500 ms for those with
// behaviour wait, so a drain and undrain within a caller's deadline costs
// wait callers a delay, not an error. Any other error would reach Flux's
// users as a failed execution or an unreachable agent (HTTP 500).
var ErrDraining = fmt.Errorf("agent is draining: %w for new executions until flux-agent undrain", ErrAtCapacity)

// Bounds of TailExecution.
const (
	// tailChunkBytes bounds one OutputChunk: a long output comes in
	// pieces, so neither side holds it whole.
	tailChunkBytes = 256 << 10
	// tailBufferBytes bounds the live output waiting for one slow
	// tailer; past it the tailer catches up from Redis instead.
	tailBufferBytes = 1 << 20
	// tailPollInterval paces following an execution this agent does not
	// run (its record is in Redis only), as Flux's own polling does.
	tailPollInterval = 500 * time.Millisecond
)

// AdminInfo is what the admin's Status says of the agent beyond what the
// service knows itself.
type AdminInfo struct {
	Commit         string
	GRPCAddress    string
	MetricsAddress string
	TLS            bool
}

// Admin is the agent's own AdminService, for the operator on the node: it
// is served only on the local admin endpoint, never to Flux.
type Admin struct {
	fluxpb.UnimplementedAdminServiceServer

	s    *Service
	info AdminInfo
}

// Admin returns the AdminService of s.
func (s *Service) Admin(info AdminInfo) *Admin { return &Admin{s: s, info: info} }

// retriedByFlux reports whether Flux retries a refused execution with the
// same id: a drain's refusal of a function with behaviour wait. It must then
// leave no record, which would make the retry a duplicate id.
func (s *Service) retriedByFlux(req *fluxpb.ExecutionRequest, cause error) bool {
	if !errors.Is(cause, ErrDraining) {
		return false
	}
	s.mu.Lock()
	fn := s.functions[req.GetFunctionName()]
	s.mu.Unlock()
	return fn != nil && fn.cfg.GetMaxConcurrencyBehavior() == BehaviorWait
}

// Drain refuses new executions with ErrDraining (HealthCheck then says
// unhealthy); running and queued ones go on to their end. It is not kept
// across restarts.
func (a *Admin) Drain(context.Context, *fluxpb.DrainRequest) (*fluxpb.DrainResponse, error) {
	a.s.mu.Lock()
	shutting := a.s.draining
	a.s.mu.Unlock()
	if shutting {
		return nil, status.Error(grpccodes.FailedPrecondition, ErrShuttingDown.Error())
	}
	if !a.s.drained.Swap(true) {
		a.s.logger.Info("draining: new executions are refused until undrain", "active_tasks", a.s.ActiveTasks())
	}
	running, queued := a.s.slots.counts()
	return &fluxpb.DrainResponse{Running: int32(running), Queued: int32(queued)}, nil
}

// Undrain takes new executions again, unless the agent is shutting down.
func (a *Admin) Undrain(context.Context, *fluxpb.UndrainRequest) (*fluxpb.UndrainResponse, error) {
	a.s.mu.Lock()
	shutting := a.s.draining
	a.s.mu.Unlock()
	if shutting {
		return nil, status.Error(grpccodes.FailedPrecondition, ErrShuttingDown.Error()+": it cannot be undrained")
	}
	if a.s.drained.Swap(false) {
		a.s.logger.Info("undrained: new executions are taken again")
	}
	return &fluxpb.UndrainResponse{}, nil
}

// Status gathers what the operator asks first: health as Flux sees it,
// isolation, load and Redis's round trip.
func (a *Admin) Status(ctx context.Context, _ *fluxpb.StatusRequest) (*fluxpb.StatusResponse, error) {
	s := a.s
	resp := &fluxpb.StatusResponse{
		AgentId:        s.opts.AgentID,
		Version:        s.opts.Version,
		Commit:         a.info.Commit,
		Draining:       s.drained.Load(),
		Pid:            int32(os.Getpid()),
		GrpcAddress:    a.info.GRPCAddress,
		MetricsAddress: a.info.MetricsAddress,
		Tls:            a.info.TLS,
		QueueLimit:     int32(s.opts.QueueLimit),
	}
	if err := s.Ready(ctx); err != nil {
		resp.UnhealthyReason = err.Error()
	} else {
		resp.Healthy = true
	}
	pingCtx, cancel := context.WithTimeout(ctx, healthCheckTimeout)
	start := time.Now()
	err := s.state.ping(pingCtx)
	rtt := time.Since(start)
	cancel()
	if err != nil {
		resp.RedisError = err.Error()
	} else {
		resp.RedisRttUs = rtt.Microseconds()
	}
	running, queued := s.slots.counts()
	resp.Running, resp.Queued = int32(running), int32(queued)
	resp.Node, _ = s.ReportNodeStatus(ctx, nil)
	if s.opts.Sandbox != nil {
		iso := s.opts.Sandbox.Isolation()
		resp.Isolation = &fluxpb.Isolation{
			Cgroup: iso.Cgroup, User: iso.User, UidRange: iso.UIDRange.String(),
			Namespaces: iso.Namespaces, Network: string(iso.Network), Degraded: iso.Degraded,
		}
	}
	return resp, nil
}

// ListExecutions lists what runs and waits now, oldest first, with what
// each has used so far.
func (a *Admin) ListExecutions(context.Context, *fluxpb.ListExecutionsRequest) (*fluxpb.ListExecutionsResponse, error) {
	now := time.Now()
	active := a.s.activeExecutions()
	infos := make([]*fluxpb.ExecutionInfo, 0, len(active))
	for _, e := range active {
		infos = append(infos, a.s.describe(e, now))
	}
	slices.SortFunc(infos, func(x, y *fluxpb.ExecutionInfo) int {
		return cmp.Compare(x.GetStartedAtUnixMs(), y.GetStartedAtUnixMs())
	})
	return &fluxpb.ListExecutionsResponse{Executions: infos}, nil
}

// describe reads what is known of a live execution without waiting on it.
// Fields its run goroutine writes are read only once it published them
// under e.mu (proc set after code).
func (s *Service) describe(e *execution, now time.Time) *fluxpb.ExecutionInfo {
	started := e.rec.StartedAt // set before the run goroutine starts
	info := &fluxpb.ExecutionInfo{
		ExecutionId:     e.id,
		FunctionName:    e.fn.cfg.GetName(),
		Async:           e.async,
		Queued:          s.slots.waiting(e.slot),
		StartedAtUnixMs: started.UnixMilli(),
		AgeMs:           now.Sub(started).Milliseconds(),
		TimeoutMs:       e.fn.timeout.Milliseconds(),
	}
	if m := e.fn.limits.MemoryBytes; m != nil {
		info.MemoryLimitBytes = *m
	}
	e.mu.Lock()
	proc, out := e.proc, e.out
	if proc != nil {
		info.CodeVersion = e.code.Version
	}
	e.mu.Unlock()
	if out != nil {
		info.OutputBytes = out.stats().total
	}
	if proc == nil {
		return info
	}
	// The sandbox answers only while the execution is not over: then the
	// figures, and the pid, are still this execution's.
	u, err := proc.Usage()
	if errors.Is(err, sandbox.ErrExecutionOver) {
		return info // reaped: its pid may be another's now
	}
	info.Pid = int32(proc.Pid())
	if err != nil {
		e.logger.Debug("reading a running execution's usage", "err", err)
		return info
	}
	// A uid of -1 (Windows: none) shows as 0, the wire's "unknown".
	info.Uid, info.MemoryBytes, info.CpuTimeMs = int32(max(u.UID, 0)), u.MemoryBytes, u.CPUTime.Milliseconds()
	return info
}

// ListFunctions lists the registered functions with their deployed
// version and how many of their executions are active.
func (a *Admin) ListFunctions(ctx context.Context, _ *fluxpb.ListFunctionsRequest) (*fluxpb.ListFunctionsResponse, error) {
	cfgs, err := a.s.state.functions(ctx)
	if err != nil {
		a.s.metrics.RedisError(ctx, "list_functions")
		return nil, toStatus(err)
	}
	active := map[string]int32{}
	for _, e := range a.s.activeExecutions() {
		active[e.fn.cfg.GetName()]++
	}
	infos := make([]*fluxpb.FunctionInfo, 0, len(cfgs))
	for _, cfg := range cfgs {
		info := &fluxpb.FunctionInfo{Config: cfg, Running: active[cfg.GetName()]}
		if code, err := a.s.code.Checkout(cfg.GetName(), cfg.GetHandler()); err == nil {
			info.Version = code.Version
			code.Release()
		}
		infos = append(infos, info)
	}
	return &fluxpb.ListFunctionsResponse{Functions: infos}, nil
}

// functions returns every registered function, by name.
func (s *state) functions(ctx context.Context) ([]*fluxpb.FunctionConfig, error) {
	all, err := s.rdb.HGetAll(ctx, s.functionsKey()).Result()
	if err != nil {
		return nil, fmt.Errorf("list functions: %w", err)
	}
	cfgs := make([]*fluxpb.FunctionConfig, 0, len(all))
	for name, data := range all {
		fn := &fluxpb.FunctionConfig{}
		if err := protojson.Unmarshal([]byte(data), fn); err != nil {
			return nil, fmt.Errorf("decode function %s: %w", name, err)
		}
		cfgs = append(cfgs, fn)
	}
	slices.SortFunc(cfgs, func(x, y *fluxpb.FunctionConfig) int { return cmp.Compare(x.GetName(), y.GetName()) })
	return cfgs, nil
}

// outputRange reads at most n bytes of an execution's stored output from
// offset; fewer means the stored output ends there.
func (s *state) outputRange(ctx context.Context, id string, offset, n int64) ([]byte, error) {
	out, err := s.rdb.GetRange(ctx, s.outputKey(id), offset, offset+n-1).Bytes()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("read output of %s: %w", id, err)
	}
	return out, nil
}

// activeExecution returns the execution of id this agent runs or queues,
// or nil.
func (s *Service) activeExecution(id string) *execution {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active[id]
}

// TailExecution streams an execution's output from req's offset, then its
// record. Offsets are those of the stored output, so what a client got
// before a reconnect and what it gets after meet exactly. An execution
// this agent runs is followed live from its memory (the bytes reach the
// client before Redis has them); what it wrote before the tail began, and
// every execution this agent does not run, come from Redis.
func (a *Admin) TailExecution(req *fluxpb.TailExecutionRequest, stream fluxpb.AdminService_TailExecutionServer) error {
	id := req.GetExecutionId()
	if !executionIDPattern.MatchString(id) {
		return status.Errorf(grpccodes.InvalidArgument, "execution id %q is malformed", id)
	}
	if req.GetOffset() < 0 {
		return status.Errorf(grpccodes.InvalidArgument, "offset %d is negative", req.GetOffset())
	}
	t := &tail{s: a.s, id: id, pos: req.GetOffset(), stream: stream}
	if e := a.s.activeExecution(id); e != nil {
		return t.local(stream.Context(), e, req.GetFollow())
	}
	return t.stored(stream.Context(), req.GetFollow())
}

// tail is one TailExecution call; pos is the offset of the next byte the
// client gets.
type tail struct {
	s      *Service
	id     string
	pos    int64
	stream fluxpb.AdminService_TailExecutionServer
}

// local follows an execution this agent runs. The feed holds what the
// function writes from the moment the tail subscribed; what it wrote
// before is in Redis, or will be within one flush.
func (t *tail) local(ctx context.Context, e *execution, follow bool) error {
	sub := e.feed.subscribe()
	defer func() { e.feed.unsubscribe(sub) }()
	for {
		for t.pos < sub.start {
			flushed := e.feed.nextFlush()
			if _, err := t.fromRedis(ctx, sub.start); err != nil {
				return err
			}
			if t.pos >= sub.start {
				break
			}
			select {
			case <-flushed:
			case <-e.done:
				return t.finish(ctx, e, sub)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		base, data, lagged := e.feed.take(sub)
		if lagged { // the client reads slower than the function writes
			e.feed.unsubscribe(sub)
			sub = e.feed.subscribe()
			continue
		}
		if err := t.sendFrom(base, data); err != nil {
			return err
		}
		if !follow {
			return t.endNow(ctx, e)
		}
		select {
		case <-sub.ready:
		case <-e.done:
			return t.finish(ctx, e, sub)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// finish ends the tail of an execution that is over: the rest of its
// output and its final record, both in Redis now (the final write stores
// the output first).
func (t *tail) finish(ctx context.Context, e *execution, sub *tailSub) error {
	if base, data, lagged := e.feed.take(sub); !lagged && base <= t.pos {
		if err := t.sendFrom(base, data); err != nil {
			return err
		}
	}
	if _, err := t.fromRedis(ctx, -1); err != nil {
		return err
	}
	rec := e.rec // final: e.done is closed
	return t.sendEnd(&rec)
}

// endNow ends a tail without follow of an execution still running: its
// record as stored now.
func (t *tail) endNow(ctx context.Context, e *execution) error {
	select {
	case <-e.done:
		return t.finish(ctx, e, &tailSub{start: t.pos, base: t.pos})
	default:
	}
	rec, err := t.s.state.record(ctx, t.id)
	if err != nil {
		return toStatus(err)
	}
	if rec == nil { // the id's claim is still on its way
		rec = &Record{ExecutionID: t.id, AgentID: t.s.opts.AgentID, FunctionName: e.fn.cfg.GetName(), Status: StatusRunning, StartedAt: e.rec.StartedAt, Async: e.async}
	}
	return t.sendEnd(rec)
}

// stored tails an execution from Redis alone: one this agent does not run
// (it ended, or it is an earlier run's). A follow of a record that still
// says running polls it, as Flux does.
func (t *tail) stored(ctx context.Context, follow bool) error {
	poll := time.NewTimer(tailPollInterval)
	defer poll.Stop()
	for {
		// The record first: once it is final, all of its output is stored.
		rec, err := t.s.state.record(ctx, t.id)
		if err != nil {
			return toStatus(err)
		}
		if rec == nil {
			return status.Errorf(grpccodes.NotFound, "execution %s is not known to this agent (records are kept for execution_ttl)", t.id)
		}
		if _, err := t.fromRedis(ctx, -1); err != nil {
			return err
		}
		if rec.Final() || !follow {
			return t.sendEnd(rec)
		}
		poll.Reset(tailPollInterval)
		select {
		case <-poll.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// fromRedis sends the stored output from pos up to end (-1: all there is)
// and reports whether it got to end.
func (t *tail) fromRedis(ctx context.Context, end int64) (bool, error) {
	for end < 0 || t.pos < end {
		n := int64(tailChunkBytes)
		if end >= 0 {
			n = min(n, end-t.pos)
		}
		data, err := t.s.state.outputRange(ctx, t.id, t.pos, n)
		if err != nil {
			t.s.metrics.RedisError(ctx, "tail_output")
			return false, toStatus(err)
		}
		if err := t.sendOutput(data); err != nil {
			return false, err
		}
		if int64(len(data)) < n {
			return false, nil
		}
	}
	return true, nil
}

// sendFrom sends the part of data (output from offset base) the client
// does not have yet.
func (t *tail) sendFrom(base int64, data []byte) error {
	if base > t.pos {
		return status.Errorf(grpccodes.Internal, "tail of %s: output from %d missing before %d", t.id, t.pos, base)
	}
	if skip := t.pos - base; skip < int64(len(data)) {
		return t.sendOutput(data[skip:])
	}
	return nil
}

// sendOutput sends data, the output from pos, in chunks.
func (t *tail) sendOutput(data []byte) error {
	for len(data) > 0 {
		n := min(len(data), tailChunkBytes)
		err := t.stream.Send(&fluxpb.TailExecutionResponse{Event: &fluxpb.TailExecutionResponse_Output{
			Output: &fluxpb.OutputChunk{Offset: t.pos, Data: data[:n]},
		}})
		if err != nil {
			return err
		}
		t.pos += int64(n)
		data = data[n:]
	}
	return nil
}

// sendEnd sends the record, without its output, and ends the tail.
func (t *tail) sendEnd(rec *Record) error {
	r := *rec
	r.Output = ""
	data, err := encodeJSON(r)
	if err != nil {
		return status.Errorf(grpccodes.Internal, "encode record %s: %v", t.id, err)
	}
	return t.stream.Send(&fluxpb.TailExecutionResponse{Event: &fluxpb.TailExecutionResponse_End{
		End: &fluxpb.ExecutionEnd{Record: data, Final: r.Final()},
	}})
}

// outputFeed hands an execution's output, byte for byte as its stream
// keeps it, to the tails following it live, and says how much of it Redis
// holds. The zero value is ready; an execution without tails pays one
// uncontended lock per write.
type outputFeed struct {
	mu     sync.Mutex
	next   int64 // offset of the next byte kept
	subs   map[*tailSub]struct{}
	stored int64         // the output before this offset is in Redis
	flush  chan struct{} // closed when stored grows; nil until asked for
}

// tailSub is one tail's share of the feed: the output from base on, held
// for it until it takes it, at most tailBufferBytes.
type tailSub struct {
	start  int64 // the offset at which it subscribed
	base   int64 // offset of buf's first byte
	buf    []byte
	lagged bool          // buf overflowed and was dropped
	ready  chan struct{} // capacity 1: there is output to take
}

// publish is the stream's tap: b follows what was kept before it.
func (f *outputFeed) publish(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next += int64(len(b))
	for sub := range f.subs {
		if sub.lagged {
			continue
		}
		if len(sub.buf)+len(b) > tailBufferBytes {
			sub.lagged, sub.buf = true, nil
		} else {
			sub.buf = append(sub.buf, b...)
		}
		signal(sub.ready)
	}
}

// flushed notes that the output before end is in Redis.
func (f *outputFeed) flushed(end int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if end > f.stored {
		f.stored = end
		if f.flush != nil {
			close(f.flush)
			f.flush = nil
		}
	}
}

// nextFlush returns a channel closed at the next write of output to
// Redis.
func (f *outputFeed) nextFlush() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.flush == nil {
		f.flush = make(chan struct{})
	}
	return f.flush
}

func (f *outputFeed) subscribe() *tailSub {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.subs == nil {
		f.subs = map[*tailSub]struct{}{}
	}
	sub := &tailSub{start: f.next, base: f.next, ready: make(chan struct{}, 1)}
	f.subs[sub] = struct{}{}
	return sub
}

func (f *outputFeed) unsubscribe(sub *tailSub) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.subs, sub)
}

// take returns the output held for sub since the last take and the offset
// it starts at, or lagged when some was dropped.
func (f *outputFeed) take(sub *tailSub) (base int64, data []byte, lagged bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	base, data = sub.base, sub.buf
	sub.base += int64(len(data))
	sub.buf = nil
	return base, data, sub.lagged
}
