// Package service implements Flux's AgentService: function registration
// and deployment, the execution lifecycle (sync, async, queued, cancelled,
// timed out) with records in Redis, health and node status.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/nodeinfo"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// healthCheckTimeout bounds the Redis ping behind HealthCheck, well inside
// the 3 s deadline Flux gives the call.
const healthCheckTimeout = time.Second

// Defaults of the node-wide memory bounds (Options.SyncOutputBytes,
// Options.ReplyBytes).
const (
	// DefaultSyncOutputBytes is what all running sync executions may keep
	// of their output for their replies, together: four replies at the
	// default output limit.
	DefaultSyncOutputBytes = 64 << 20
	// DefaultReplyBytes bounds the GetExecution replies being built at
	// once: enough for the largest (a 48 MiB record built from its output)
	// or many ordinary ones.
	DefaultReplyBytes = 96 << 20
)

// ShutdownAfterGrace bounds what Shutdown does once its grace is over:
// killing what still runs and writing final records. Past it, Shutdown
// returns whatever Redis does; what it could not write is settled at the
// next start.
const ShutdownAfterGrace = 5 * time.Second

// abandonMargin is the part of ShutdownAfterGrace left for executions to
// end once their Redis writes are given up: a write under way may block
// for redisTryTimeout still.
const abandonMargin = redisTryTimeout + 500*time.Millisecond

// NodeStats is what ReportNodeStatus reads: sampled in the background, read
// in nanoseconds.
type NodeStats interface {
	CPUPercent() float64
	Memory() nodeinfo.Memory
}

// NodeIPs gives the IPs injected into every execution.
type NodeIPs interface {
	PrivateIP() string
	PublicIP() string
}

// Options configure a Service.
type Options struct {
	AgentID string
	Version string
	// Redis holds the agent's state. A Cluster client gets a hook that
	// makes it re-read the slot map when a command fails (see
	// clusterFollower).
	Redis        redis.UniversalClient
	ExecutionTTL time.Duration
	OutputLimit  int64
	MaxTasks     int
	QueueLimit   int
	KillGrace    time.Duration
	// DefaultTimeout applies to functions whose timeout_seconds is 0;
	// 0 means none.
	DefaultTimeout time.Duration
	// DefaultMemoryBytes applies to functions whose memory_mb is 0; 0
	// means none.
	DefaultMemoryBytes int64
	// SyncOutputBytes bounds the output all running sync executions keep
	// for their replies, together; a reply past it is cut with a marker
	// (the record keeps the whole output). 0 means DefaultSyncOutputBytes.
	SyncOutputBytes int64
	// ReplyBytes bounds the memory of the GetExecution replies being
	// built at once; callers beyond it wait, within their deadline. 0
	// means DefaultReplyBytes.
	ReplyBytes int64
	// AppsDir is where the code store keeps each function's code; the
	// service keeps a copy of each function's config there
	// (<name>/function.json), so functions survive Redis losing them.
	// "" keeps none.
	AppsDir string
	// SpoolDir is where running executions keep a copy of their output on
	// disk, to write it again if Redis loses it; "" is the system's temp
	// dir. The files have no name (they are unlinked once open).
	SpoolDir    string
	Sandbox     *sandbox.Sandbox
	Deployments *deployments.Store
	Node        NodeStats
	IPs         NodeIPs
	Metrics     Metrics
	Tracer      trace.TracerProvider
	Logger      *slog.Logger
}

// Service is the agent's gRPC AgentService.
type Service struct {
	fluxpb.UnimplementedAgentServiceServer

	opts       Options
	sandbox    Sandbox
	code       CodeStore
	state      *state
	local      *localFunctions
	finals     *finals
	slots      *slots
	syncOutput *byteBudget
	replies    *byteBudget
	sending    sync.Map    // *fluxpb.GetExecutionResponse → its *replyTicket
	zeroCopy   atomic.Bool // ServerCodec sends records without a copy
	metrics    Metrics
	tracer     trace.Tracer
	logger     *slog.Logger
	startedAt  time.Time

	mu         sync.Mutex
	functions  map[string]*function
	active     map[string]*execution
	draining   bool
	idle       chan struct{}      // closed once draining and nothing is active
	stopUpkeep context.CancelFunc // set by Start
	upkeepDone sync.WaitGroup

	settleMu sync.Mutex
	toSettle map[string]toSettle

	// drained is set by the admin's Drain: new executions are refused
	// until Undrain.
	drained atomic.Bool
}

// New returns a Service. It starts nothing in the background.
func New(opts Options) (*Service, error) {
	if opts.Sandbox == nil || opts.Deployments == nil {
		return nil, errors.New("service: Sandbox and Deployments are required")
	}
	return newService(opts, nativeSandbox{opts.Sandbox}, deployedCode{opts.Deployments})
}

// newService is New with the sandbox and code store as interfaces, which
// tests fake.
func newService(opts Options, sb Sandbox, code CodeStore) (*Service, error) {
	switch {
	case opts.AgentID == "":
		return nil, errors.New("service: agent id is required")
	case opts.Redis == nil, sb == nil, code == nil, opts.Node == nil, opts.IPs == nil:
		return nil, errors.New("service: Redis, Sandbox, Deployments, Node and IPs are required")
	case opts.OutputLimit <= 0 || opts.ExecutionTTL <= 0:
		return nil, errors.New("service: output limit and execution TTL must be positive")
	case opts.DefaultTimeout < 0 || opts.DefaultMemoryBytes < 0 || opts.SyncOutputBytes < 0 || opts.ReplyBytes < 0:
		return nil, errors.New("service: default limits and memory bounds must not be negative")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = noMetrics{}
	}
	if opts.Tracer == nil {
		opts.Tracer = noop.NewTracerProvider()
	}
	if opts.SyncOutputBytes == 0 {
		opts.SyncOutputBytes = DefaultSyncOutputBytes
	}
	if opts.ReplyBytes == 0 {
		opts.ReplyBytes = DefaultReplyBytes
	}
	local, err := openLocalFunctions(opts.AppsDir)
	if err != nil {
		return nil, err
	}
	st := &state{rdb: opts.Redis, agentID: opts.AgentID, ttl: opts.ExecutionTTL}
	if c, ok := opts.Redis.(*redis.ClusterClient); ok {
		c.AddHook(&clusterFollower{client: c})
	}
	s := &Service{
		opts:       opts,
		sandbox:    sb,
		code:       code,
		state:      st,
		local:      local,
		slots:      newSlots(opts.MaxTasks, opts.QueueLimit),
		syncOutput: newByteBudget(opts.SyncOutputBytes),
		replies:    newByteBudget(opts.ReplyBytes),
		metrics:    opts.Metrics,
		tracer:     opts.Tracer.Tracer(tracerName),
		logger:     opts.Logger,
		startedAt:  time.Now(),
		functions:  map[string]*function{},
		active:     map[string]*execution{},
		idle:       make(chan struct{}),
		toSettle:   map[string]toSettle{},
	}
	s.finals = newFinals(st, opts.Logger, opts.Metrics, func(id string) { s.queueSettle(id, reasonFinalDropped, 0) })
	fns, errs := local.load()
	for _, err := range errs {
		opts.Logger.Warn("function config not restored from its local copy", "err", err)
	}
	for _, fn := range fns {
		s.functions[fn.GetName()] = s.newFunction(fn)
	}
	return s, nil
}

// RegisterFunction stores a function's config; it survives agent restarts.
func (s *Service) RegisterFunction(ctx context.Context, fn *fluxpb.FunctionConfig) (*fluxpb.FunctionAck, error) {
	if err := validateFunction(fn); err != nil {
		return &fluxpb.FunctionAck{Success: false, Message: err.Error()}, nil
	}
	fn = proto.CloneOf(fn)
	if err := s.state.saveFunction(ctx, fn); err != nil {
		s.metrics.RedisError(ctx, "save_function")
		s.logger.ErrorContext(ctx, "register function", "function", fn.GetName(), "err", err)
		return &fluxpb.FunctionAck{Success: false, Message: "could not store the function: " + err.Error()}, nil
	}
	// Redis has it, so it is the config in force; the copy only survives
	// Redis losing it.
	s.mu.Lock()
	s.functions[fn.GetName()] = s.newFunction(fn)
	s.mu.Unlock()
	s.slots.setLimit(fn.GetName(), int(fn.GetMaxConcurrency()))
	if err := s.local.save(fn); err != nil {
		// An old copy must not bring the old config back at the next start.
		err = errors.Join(err, s.local.remove(fn.GetName()))
		s.logger.ErrorContext(ctx, "register function: no local copy", "function", fn.GetName(), "err", err)
		return &fluxpb.FunctionAck{Success: false, Message: "the function is stored in Redis, but not on the agent's disk: " + err.Error()}, nil
	}
	s.logger.InfoContext(ctx, "function registered", "function", fn.GetName(), "handler", fn.GetHandler(),
		"memory_mb", fn.GetMemoryMb(), "cpu_millicores", fn.GetCpuMillicores(), "timeout_seconds", fn.GetTimeoutSeconds(),
		"max_concurrency", fn.GetMaxConcurrency(), "max_concurrency_behavior", fn.GetMaxConcurrencyBehavior())
	return &fluxpb.FunctionAck{Success: true, Message: "function " + fn.GetName() + " registered"}, nil
}

// function returns a registered function, from memory or, after a
// restart, from Redis.
func (s *Service) function(ctx context.Context, name string) (*function, error) {
	s.mu.Lock()
	fn := s.functions[name]
	s.mu.Unlock()
	if fn != nil {
		return fn, nil
	}
	cfg, err := s.state.loadFunction(ctx, name)
	if err != nil {
		s.metrics.RedisError(ctx, "load_function")
		return nil, err
	}
	if cfg == nil {
		return nil, fmt.Errorf("function %s: %w", name, ErrNotRegistered)
	}
	s.mu.Lock()
	fn = s.functions[name]
	if fn == nil { // a RegisterFunction may have won the race
		fn = s.newFunction(cfg)
		s.functions[name] = fn
	}
	s.mu.Unlock()
	// Registered before the agent kept copies: keep one now.
	if err := s.local.save(fn.cfg); err != nil {
		s.logger.WarnContext(ctx, "no local copy of a function's config", "function", name, "err", err)
	}
	return fn, nil
}

// DeployFunction installs a function's code as a new version; running
// executions keep the version they started with.
func (s *Service) DeployFunction(ctx context.Context, pkg *fluxpb.DeploymentPackage) (*fluxpb.DeploymentAck, error) {
	name := pkg.GetFunctionName()
	if err := deployments.ValidName(name); err != nil {
		return &fluxpb.DeploymentAck{Message: err.Error()}, nil
	}
	// Flux never sets config; a caller that does registers and deploys in
	// one step, and a failed deploy must leave the old registration too.
	fn := pkg.GetConfig()
	if fn != nil {
		fn = proto.CloneOf(fn)
		if fn.GetName() == "" {
			fn.Name = name
		}
		if fn.GetName() != name {
			return &fluxpb.DeploymentAck{Message: fmt.Sprintf("config.name %q does not match function_name %q", fn.GetName(), name)}, nil
		}
		if err := validateFunction(fn); err != nil {
			return &fluxpb.DeploymentAck{Message: err.Error()}, nil
		}
	} else {
		registered, err := s.function(ctx, name)
		if err != nil {
			return &fluxpb.DeploymentAck{Message: err.Error()}, nil
		}
		fn = registered.cfg
	}
	start := time.Now()
	ctx, span := s.tracer.Start(ctx, telemetry.SpanDeploy, trace.WithAttributes(
		telemetry.AttrFunction.String(name), telemetry.AttrDeployBytes.Int(len(pkg.GetCodeArchive()))))
	defer span.End()
	d, err := s.opts.Deployments.Deploy(ctx, name, fn.GetHandler(), pkg.GetCodeArchive())
	s.metrics.Deployed(ctx, name, int64(len(pkg.GetCodeArchive())), err)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		s.logger.WarnContext(ctx, "deploy refused", "function", name, "archive_bytes", len(pkg.GetCodeArchive()), "err", err)
		return &fluxpb.DeploymentAck{Message: "deploy of " + name + " failed: " + err.Error()}, nil
	}
	span.SetAttributes(telemetry.AttrFunctionVersion.String(d.Version), telemetry.AttrDeployFiles.Int(d.Files))
	if pkg.GetConfig() != nil {
		if ack, _ := s.RegisterFunction(ctx, fn); !ack.GetSuccess() {
			return &fluxpb.DeploymentAck{Message: "deployed, but " + ack.GetMessage()}, nil
		}
	}
	msg := fmt.Sprintf("function %s deployed as version %s (%d files, %d bytes)", name, d.Version, d.Files, d.Bytes)
	if d.Unchanged {
		msg = fmt.Sprintf("function %s already at version %s (same archive)", name, d.Version)
	}
	s.logger.InfoContext(ctx, "function deployed", "function", name, "version", d.Version, "files", d.Files,
		"bytes", d.Bytes, "unchanged", d.Unchanged, "duration", time.Since(start))
	return &fluxpb.DeploymentAck{Success: true, Message: msg}, nil
}

// HealthCheck says whether this agent can work: Redis answers.
func (s *Service) HealthCheck(ctx context.Context, _ *fluxpb.HealthCheckRequest) (*fluxpb.HealthCheckResponse, error) {
	return &fluxpb.HealthCheckResponse{Healthy: s.Ready(ctx) == nil, Version: s.opts.Version}, nil
}

// Ready reports why the agent cannot serve executions, or nil.
func (s *Service) Ready(ctx context.Context) error {
	s.mu.Lock()
	draining := s.draining
	s.mu.Unlock()
	if draining {
		return ErrShuttingDown
	}
	if s.drained.Load() {
		return ErrDraining
	}
	ctx, cancel := context.WithTimeout(ctx, healthCheckTimeout)
	defer cancel()
	if err := s.state.ping(ctx); err != nil {
		s.metrics.RedisError(ctx, "ping")
		return fmt.Errorf("redis: %w", err)
	}
	return nil
}

// ReportNodeStatus answers from memory: every figure is sampled in the
// background or counted as executions come and go.
func (s *Service) ReportNodeStatus(_ context.Context, _ *fluxpb.NodeStatusRequest) (*fluxpb.NodeStatusResponse, error) {
	mem := s.opts.Node.Memory()
	return &fluxpb.NodeStatusResponse{
		AgentId:       s.opts.AgentID,
		CpuPercent:    s.opts.Node.CPUPercent(),
		MemoryPercent: mem.Percent(),
		MemoryTotalMb: mem.TotalBytes >> 20,
		MemoryUsedMb:  mem.UsedBytes >> 20,
		ActiveTasks:   int32(s.ActiveTasks()),
		MaxTasks:      int32(s.opts.MaxTasks),
		UptimeSeconds: int64(time.Since(s.startedAt).Seconds()),
	}, nil
}

// ActiveTasks counts every execution this agent has accepted and not
// finished, sync or async, running or queued, and those whose final
// records still wait for Redis: Flux drains a node only when this is 0,
// and a node taken away before would lose them.
func (s *Service) ActiveTasks() int {
	s.mu.Lock()
	n := len(s.active)
	s.mu.Unlock()
	return n + s.finals.count()
}

// Shutdown refuses new executions (HealthCheck then says unhealthy),
// cancels the queued ones, lets running ones finish until ctx is done
// (the grace), then kills what remains and returns once every execution
// ended, or ShutdownAfterGrace after the grace, whatever Redis does. It
// also stops the upkeep Start began: final records still waiting for
// Redis then stay in the running set, and the next start settles them,
// as it does the executions that did not end. The error says how many
// there are. The gRPC server keeps serving meanwhile, so Flux still reads
// live output and cancels.
func (s *Service) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.draining {
		s.draining = true
		if len(s.active) == 0 {
			close(s.idle)
		}
	}
	s.mu.Unlock()
	defer s.local.close()
	for _, e := range s.activeExecutions() {
		if s.slots.waiting(e.slot) {
			e.cancel("the agent shut down before the execution started")
		}
	}
	select {
	case <-s.idle:
		s.stopBackground()
		return s.unsettled(0)
	case <-ctx.Done():
	}
	remaining := s.activeExecutions()
	s.logger.Warn("shutdown grace is over; killing remaining executions", "count", len(remaining))
	for _, e := range remaining {
		e.cancel("the agent shut down before the execution finished")
	}
	// The upkeep stops meanwhile: it may be in a Redis try.
	upkeepStopped := make(chan struct{})
	go func() {
		s.stopBackground()
		close(upkeepStopped)
	}()
	end := time.NewTimer(ShutdownAfterGrace)
	defer end.Stop()
	abandon := time.NewTimer(ShutdownAfterGrace - abandonMargin)
	defer abandon.Stop()
	select {
	case <-s.idle:
	case <-abandon.C:
		for _, e := range s.activeExecutions() {
			e.abandon()
		}
		select {
		case <-s.idle:
		case <-end.C:
			return s.unsettled(len(s.activeExecutions()))
		}
	}
	select {
	case <-upkeepStopped:
	case <-end.C:
	}
	return s.unsettled(0)
}

// unsettled says what Shutdown leaves for the next start to settle.
func (s *Service) unsettled(running int) error {
	pending := s.finals.count()
	if running == 0 && pending == 0 {
		return nil
	}
	return fmt.Errorf("%d executions did not end within %s of the grace, %d final records were not written; the next start settles them",
		running, ShutdownAfterGrace, pending)
}

// activeExecutions lists the executions admitted and not yet retired.
func (s *Service) activeExecutions() []*execution {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.active))
}

// Settle marks the executions that a previous run of this agent left
// "running" (it crashed or was killed) as failed, so Flux does not wait on
// them until their records expire, once, within ctx. Start does the same
// in the background, until Redis answers, and keeps doing it.
func (s *Service) Settle(ctx context.Context) (int, error) {
	n, err := s.state.settle(ctx, s.owns, s.settleReason)
	if err != nil {
		s.metrics.RedisError(ctx, "settle")
	}
	return n, err
}

// toStatus maps domain errors of malformed requests to gRPC codes; domain
// failures of an execution go in the response's error field instead.
func toStatus(err error) error {
	switch {
	case errors.Is(err, ErrInvalidRequest), errors.Is(err, deployments.ErrInvalidName):
		return status.Error(grpccodes.InvalidArgument, err.Error())
	case errors.Is(err, ErrDuplicateExecution):
		return status.Error(grpccodes.AlreadyExists, err.Error())
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		// The caller's deadline passed while the agent waited on Redis.
		return status.FromContextError(err).Err()
	default:
		// The agent cannot work right now (shutting down, Redis down): Flux
		// shows it as a failure to reach the agent, which it is.
		return status.Error(grpccodes.Unavailable, err.Error())
	}
}
