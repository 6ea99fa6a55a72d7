// Command flux-agent is the worker of Serverless Fabric: Flux drives it over
// gRPC to register, deploy and run functions as native, sandboxed processes.
//
// main wires the parts together and owns the process: configuration,
// signals, lifetimes and the exit code. Nothing else exits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/serverless-fabric/flux-agent/cli"
	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/doctor"
	"github.com/serverless-fabric/flux-agent/nodeinfo"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/service"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// Set by the release build (-ldflags "-X main.version=... -X main.commit=...").
var (
	version = "dev"
	commit  = "none"
)

// maxMessageBytes is above Flux's own 50 MiB so its largest deploy fits.
const maxMessageBytes = 64 << 20

// telemetryFlushTimeout bounds the final flush when a collector is slow.
const telemetryFlushTimeout = 5 * time.Second

// startUpkeepWait bounds the first upkeep round at start (settling what an
// earlier run left running): an agent whose Redis is down still starts
// and serves, and the upkeep finishes the round when Redis answers.
const startUpkeepWait = 10 * time.Second

func main() {
	os.Exit(runUntilStopped(func(ctx context.Context) int {
		return run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}))
}

// run is the whole program; ctx ends when the agent is asked to stop (a
// signal, or the Windows service manager). It returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("flux-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() { usage(fs.Output()) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion {
		fmt.Fprintf(stdout, "flux-agent %s (%s) %s/%s\n", version, commit, runtime.GOOS, runtime.GOARCH)
		return 0
	}
	cfg, err := LoadConfig(os.LookupEnv)
	if cli.IsCommand(fs.Arg(0)) {
		return cli.Run(ctx, cliEnv(cfg, err, stdout, stderr), fs.Args())
	}
	switch fs.Arg(0) {
	case "":
	case "check-config":
		if err != nil {
			fmt.Fprintf(stderr, "flux-agent: %v\n", err)
			return 1
		}
		if err := printConfig(stdout, cfg); err != nil {
			fmt.Fprintf(stderr, "flux-agent: %v\n", err)
			return 1
		}
		return 0
	default:
		fmt.Fprintf(stderr, "flux-agent: unknown command %q\n", fs.Arg(0))
		usage(stderr)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "flux-agent: %v\n", err)
		return 1
	}
	logOut := stderr
	if cfg.Log.File != "" {
		f, err := os.OpenFile(cfg.Log.File, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintf(stderr, "flux-agent: log.file: %v\n", err)
			return 1
		}
		defer f.Close()
		logOut = f
	}
	logger, err := cfg.Log.newLogger(logOut)
	if err != nil {
		fmt.Fprintf(stderr, "flux-agent: %v\n", err)
		return 1
	}
	if err := serve(ctx, cfg, logger); err != nil {
		logger.Error("flux-agent stopped", "err", err)
		if refusal := (*doctor.Refusal)(nil); errors.As(err, &refusal) {
			// In words, beside the log line: what the operator reads first.
			fmt.Fprintf(stderr, "flux-agent: %v\n", refusal)
		}
		return 1
	}
	return 0
}

// cliEnv is what the client subcommands take from the agent's config: the
// admin endpoint (the default one when the config cannot be read: the
// client may run where the agent's config is not) and doctor's view.
func cliEnv(cfg Config, cfgErr error, stdout, stderr io.Writer) cli.Env {
	admin := cfg.Admin
	if cfgErr != nil {
		admin = defaultAdminConfig()
	}
	return cli.Env{
		Stdout: stdout, Stderr: stderr,
		AdminSocket: admin.Socket, AdminAddress: admin.Address, AdminTokenFile: admin.TokenFile,
		Doctor: func() (doctor.Config, error) {
			if cfgErr != nil {
				return doctor.Config{}, cfgErr
			}
			return cfg.doctorConfig(), nil
		},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, `flux-agent runs Serverless Fabric functions as sandboxed native processes for Flux.

Usage:
  flux-agent [--version]      run the agent (or print its version)
  flux-agent check-config     validate the configuration and print the effective values

Configuration: the YAML file named by AGENT_CONFIG (default ./%s), then
environment variables %s<KEY>, which win. example.agent.yaml explains
every key:

`, DefaultConfigPath, envPrefix)
	writeDefaults(w)
	fmt.Fprintln(w)
	cli.Usage(w)
}

// serve runs the agent until ctx is cancelled (a signal), then shuts down.
func serve(ctx context.Context, cfg Config, logger *slog.Logger) (err error) {
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set {
		// The heap the agent needs beside the memory bounds it keeps
		// (sync outputs, GetExecution replies): the collector works harder
		// near it instead of letting a burst of big records grow the heap.
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	a, err := newAgent(ctx, cfg, logger)
	if err != nil {
		return err
	}
	err = a.Run(ctx)
	if cerr := a.Close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if err == nil {
		logger.Info("flux-agent stopped")
	}
	return err
}

// defaultMemoryLimit is the Go heap's soft limit unless GOMEMLIMIT says
// otherwise: service.DefaultSyncOutputBytes and DefaultReplyBytes plus
// what the agent needs beside them.
const defaultMemoryLimit = 192 << 20

// agent is one running flux-agent: every part, made by newAgent, served by
// Run, and closed by Close in the order written there.
type agent struct {
	cfg Config
	log *slog.Logger

	tel      *telemetry.Telemetry
	rdb      redis.UniversalClient
	sandbox  *sandbox.Sandbox
	store    *deployments.Store
	sampler  *nodeinfo.Sampler
	ips      *nodeinfo.IPs
	svc      *service.Service
	grpc     *grpc.Server
	health   *health.Server
	listener net.Listener
	metrics  *telemetry.HTTPServer
	// admin serves AgentService and AdminService on the admin endpoint
	// (nil when admin.socket is empty).
	admin         *grpc.Server
	adminEndpoint *adminEndpoint
}

// newAgent makes every part of the agent and binds its ports; whatever
// fails, nothing is left running. It first runs doctor's start-up checks
// and refuses to start, in doctor's words, on a host where every execution
// would fail.
func newAgent(ctx context.Context, cfg Config, logger *slog.Logger) (_ *agent, err error) {
	if err := startupChecks(cfg, logger); err != nil {
		return nil, err
	}
	a := &agent{cfg: cfg, log: logger}
	defer func() {
		if err != nil {
			err = errors.Join(err, a.Close())
		}
	}()
	host, _ := os.Hostname()
	if a.tel, err = telemetry.Setup(ctx, cfg.telemetryConfig(version, host, logger)); err != nil {
		return nil, fmt.Errorf("telemetry: %w", err)
	}
	a.tel.SetGlobal()

	redisOpts := cfg.RedisOptions()
	redisOpts.ClientName = "flux-agent:" + cfg.AgentID
	redis.SetLogger(telemetry.RedisLogger{Logger: logger.With("component", "redis")})
	a.rdb = redis.NewUniversalClient(redisOpts)
	if err := telemetry.InstrumentRedis(a.rdb, a.tel.TracerProvider); err != nil {
		return nil, fmt.Errorf("redis tracing: %w", err)
	}
	redisAddrs := func(ctx context.Context) ([]netip.Addr, error) {
		return service.RedisAddresses(ctx, a.rdb, redisOpts.Addrs)
	}
	if a.sandbox, err = sandbox.New(cfg.sandboxConfig(logger, redisAddrs)); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if a.store, err = deployments.Open(cfg.AppsDir, cfg.deployOptions(logger)); err != nil {
		return nil, fmt.Errorf("apps_dir: %w", err)
	}
	if a.sampler, err = nodeinfo.NewSampler("/proc", 0, logger); err != nil {
		return nil, fmt.Errorf("node figures: %w", err)
	}
	a.ips = nodeinfo.StartIPs(cfg.Network.NodePrivateIP, cfg.Network.NodePublicIP, cfg.Network.PublicIPURL,
		&http.Client{Timeout: nodeinfo.DefaultPublicIPTimeout}, logger)

	svcOpts := cfg.serviceLimits()
	svcOpts.AgentID, svcOpts.Version = cfg.AgentID, version
	svcOpts.Redis, svcOpts.Sandbox, svcOpts.Deployments = a.rdb, a.sandbox, a.store
	svcOpts.Node, svcOpts.IPs = a.sampler, a.ips
	svcOpts.AppsDir = cfg.AppsDir
	if svcOpts.SpoolDir, err = cfg.makeSpoolDir(); err != nil {
		return nil, err
	}
	svcOpts.Metrics, svcOpts.Tracer, svcOpts.Logger = a.tel.Metrics, a.tel.TracerProvider, logger
	if a.svc, err = service.New(svcOpts); err != nil {
		return nil, err
	}
	if a.listener, err = net.Listen("tcp", cfg.ListenAddr()); err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.ListenAddr(), err)
	}
	var limited net.Listener
	if a.grpc, a.health, limited, err = newGRPCServer(cfg, a.svc, a.tel, a.listener, logger); err != nil {
		return nil, err
	}
	a.listener = limited
	if cfg.Telemetry.MetricsAddress != "" {
		if a.metrics, err = telemetry.ListenHTTP(cfg.Telemetry.MetricsAddress, a.tel.PrometheusHandler, a.svc.Ready, logger); err != nil {
			return nil, fmt.Errorf("telemetry.metrics_address: %w", err)
		}
	}
	// Flux does not need the admin endpoint: without it the agent still
	// serves, and says why the client cannot reach it.
	if a.adminEndpoint, err = listenAdmin(cfg.Admin); err != nil {
		logger.Error("admin endpoint off: the flux-agent client cannot reach this agent", "err", err)
		a.adminEndpoint, err = nil, nil
	}
	if a.adminEndpoint != nil {
		a.admin = newAdminServer(a.svc, a.tel, a.adminEndpoint, service.AdminInfo{
			Commit: commit, GRPCAddress: a.listener.Addr().String(), MetricsAddress: addrOf(a.metrics), TLS: cfg.TLS.Enabled,
		})
	}
	if err := a.tel.Metrics.ObserveNode(nodeSample(a.sampler)); err != nil {
		logger.Warn("node metrics not registered", "err", err)
	}
	iso := a.sandbox.Isolation()
	if err := a.tel.Metrics.Isolation(ctx, iso.Cgroup, iso.User, len(iso.Degraded) > 0, iso.CheapCgroupMoves); err != nil {
		logger.Warn("isolation metric not registered", "err", err)
	}
	return a, nil
}

// Limits of the gRPC server, so that no client can exhaust the agent's
// descriptors, memory or goroutines, and none can lock Flux out. Flux holds
// one long-lived connection, calls HealthCheck on it every 10 s, and
// multiplexes every call on it.
const (
	// grpcMaxConns caps the connections, grpcMaxConnsPerSource those from
	// one address (an IPv6 /64). Past either cap the least proven idle
	// connection is closed to let the new one in (telemetry.LimitGRPCConns):
	// a flood of idle or half-open connections cannot keep Flux out, and a
	// connection that calls is closed last. A node sees a few connections
	// (Flux's, an operator's grpcurl, a probe). A flood holding all 256
	// costs a descriptor and at most 3 goroutines each, and about 16 MiB
	// (measured by e2e/limits_grpc_test.go).
	grpcMaxConns          = 256
	grpcMaxConnsPerSource = 32
	// grpcHandshakeTimeout bounds the TLS handshake and the HTTP/2 preface
	// together: a round trip or two for Flux, even across regions.
	grpcHandshakeTimeout = 10 * time.Second
	// grpcIdleTimeout closes (GOAWAY) a connection without calls for that
	// long. Flux's calls every 10 s keep its own open; a gRPC client that
	// idled out reconnects at its next call, without failing it.
	grpcIdleTimeout = time.Minute
	// grpcMinPingInterval is the shortest interval between a client's
	// keepalive pings the agent accepts, with or without calls in progress:
	// half the shortest gRPC clients allow (10 s), so timer jitter never
	// costs a well-behaved client its connection. A client pinging more
	// often gets GOAWAY too_many_pings at its third such ping (the fourth
	// in a row: the first is free).
	grpcMinPingInterval = 5 * time.Second
	// grpcPingAfter and grpcPingTimeout: after a minute without a frame the
	// agent pings the client and drops the connection if no answer comes in
	// 20 s, so the calls of a client that vanished (its host down, no FIN)
	// end, and with them its sync executions.
	grpcPingAfter   = time.Minute
	grpcPingTimeout = 20 * time.Second
	// grpcStreamHeadroom is the calls per connection beyond max_tasks
	// (every sync execution holds a stream): HealthCheck, GetExecution
	// polls, cancels and deploys must not wait behind running executions.
	// Without max_tasks, grpcStreamsWithoutTaskLimit.
	grpcStreamHeadroom          = 256
	grpcStreamsWithoutTaskLimit = 16384
	// grpcMaxHeaderBytes caps a call's metadata (gRPC's own default is
	// 16 MiB); Flux sends a few short headers and a traceparent.
	grpcMaxHeaderBytes = 16 << 10
	// grpcReadBufferBytes is each connection's read buffer (gRPC's default
	// is 32 KiB): a frame of the largest size the server accepts (16 KiB,
	// its HTTP/2 max frame size) still fits one read, and a flood of 256
	// connections costs 8 MiB less (measured: 16 MiB instead of 24).
	grpcReadBufferBytes = 16 << 10
)

// grpcMaxStreams is the calls one connection may have in progress.
func grpcMaxStreams(maxTasks int) uint32 {
	if maxTasks <= 0 {
		return grpcStreamsWithoutTaskLimit
	}
	return uint32(maxTasks + grpcStreamHeadroom)
}

// newGRPCServer is the server Flux talks to: AgentService, gRPC health and
// reflection, messages up to maxMessageBytes, mutual TLS when configured,
// the GetExecution reply handed to gRPC without a copy, and the limits
// above. It returns lis wrapped by the connection limiter: serve that.
func newGRPCServer(cfg Config, svc *service.Service, tel *telemetry.Telemetry, lis net.Listener, logger *slog.Logger) (*grpc.Server, *health.Server, net.Listener, error) {
	limited, connStats := telemetry.LimitGRPCConns(lis,
		telemetry.ConnLimits{Max: grpcMaxConns, PerSource: grpcMaxConnsPerSource}, logger)
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxSendMsgSize(maxMessageBytes),
		grpc.ForceServerCodecV2(svc.ServerCodec()),
		grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(tel.TracerProvider),
			otelgrpc.WithMeterProvider(tel.MeterProvider),
			otelgrpc.WithPropagators(tel.Propagator),
		)),
		grpc.StatsHandler(connStats),
		grpc.ConnectionTimeout(grpcHandshakeTimeout),
		grpc.MaxConcurrentStreams(grpcMaxStreams(cfg.MaxTasks.Resolve(runtime.NumCPU()))),
		grpc.MaxHeaderListSize(grpcMaxHeaderBytes),
		grpc.ReadBufferSize(grpcReadBufferBytes),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             grpcMinPingInterval,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: grpcIdleTimeout,
			Time:              grpcPingAfter,
			Timeout:           grpcPingTimeout,
		}),
	}
	if cfg.TLS.Enabled {
		tlsCfg, err := cfg.TLSServerConfig()
		if err != nil {
			return nil, nil, nil, err
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	server := grpc.NewServer(opts...)
	fluxpb.RegisterAgentServiceServer(server, svc)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	reflection.Register(server)
	return server, healthServer, limited, nil
}

// startupChecks runs doctor's checks of what would make every execution
// fail; warnings are logged, failures refuse the start.
func startupChecks(cfg Config, logger *slog.Logger) error {
	report := doctor.Startup(cfg.doctorConfig())
	for _, c := range report.Checks {
		switch c.Status {
		case doctor.Warn:
			logger.Warn("host check", "check", c.Name, "problem", c.Detail, "fix", c.Fix)
		case doctor.Fail:
			logger.Error("host check failed", "check", c.Name, "problem", c.Detail, "fix", c.Fix)
		}
	}
	if failed := report.Failed(); len(failed) > 0 {
		return &doctor.Refusal{Failed: failed}
	}
	return nil
}

// newAdminServer serves the admin endpoint: the same AgentService as
// Flux's port, AdminService, health and reflection, without TLS (the
// endpoint's own guard is enough: a root-only socket, or a token).
func newAdminServer(svc *service.Service, tel *telemetry.Telemetry, ep *adminEndpoint, info service.AdminInfo) *grpc.Server {
	opts := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxSendMsgSize(maxMessageBytes),
		grpc.ForceServerCodecV2(svc.ServerCodec()),
		grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(tel.TracerProvider),
			otelgrpc.WithMeterProvider(tel.MeterProvider),
			otelgrpc.WithPropagators(tel.Propagator),
		)),
	}, ep.ServerOptions()...)
	server := grpc.NewServer(opts...)
	fluxpb.RegisterAgentServiceServer(server, svc)
	fluxpb.RegisterAdminServiceServer(server, svc.Admin(info))
	reflection.Register(server)
	return server
}

// Run settles what an earlier run left, serves until ctx ends, then lets
// running executions finish within the shutdown grace while gRPC still
// answers Flux's GetExecution, CancelExecution and HealthCheck (now
// unhealthy).
func (a *agent) Run(ctx context.Context) error {
	// The first upkeep round settles what an earlier run left running and
	// writes back what Redis lost, before the agent serves; if Redis does
	// not answer within startUpkeepWait, the rest is done in the
	// background when it does.
	startCtx, cancelStart := context.WithTimeout(ctx, startUpkeepWait)
	a.svc.Start(startCtx)
	cancelStart()

	serveErr := make(chan error, 2)
	go func() { serveErr <- a.grpc.Serve(a.listener) }()
	adminWhere := ""
	if a.admin != nil {
		adminWhere = a.adminEndpoint.Where()
		go func() {
			if err := a.admin.Serve(a.adminEndpoint); err != nil {
				serveErr <- fmt.Errorf("admin endpoint: %w", err)
			}
		}()
	}
	iso := a.sandbox.Isolation()
	a.log.Info("flux-agent started",
		"version", version, "commit", commit, "agent_id", a.cfg.AgentID,
		"grpc_address", a.listener.Addr().String(), "tls", a.cfg.TLS.Enabled,
		"metrics_address", addrOf(a.metrics), "admin", adminWhere, "redis_addr", a.cfg.RedisAddr.String(),
		"apps_dir", a.cfg.AppsDir, "max_tasks", a.cfg.MaxTasks.Resolve(runtime.NumCPU()),
		"isolation_cgroup", iso.Cgroup, "isolation_user", iso.User, "isolation_uid_range", iso.UIDRange.String(),
		"isolation_network", iso.Network, "isolation_namespaces", iso.Namespaces, "isolation_favordynmods", iso.CheapCgroupMoves, "isolation_degraded", iso.Degraded,
		"node_private_ip", a.ips.PrivateIP())
	a.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	a.health.SetServingStatus(fluxpb.AgentService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	select {
	case <-ctx.Done():
		a.log.Info("shutting down", "grace", a.cfg.ShutdownGrace, "active_tasks", a.svc.ActiveTasks())
	case err := <-serveErr:
		return fmt.Errorf("grpc server: %w", err)
	}
	a.health.Shutdown()
	graceCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.cfg.ShutdownGrace)
	defer cancel()
	if err := a.svc.Shutdown(graceCtx); err != nil {
		a.log.Warn("shutdown: not every execution was settled; the next start settles the rest", "err", err)
	}
	return nil
}

// grpcStopTimeout bounds waiting for clients that hold streams open;
// metricsStopTimeout for requests in flight on the metrics endpoint.
const (
	grpcStopTimeout    = time.Second
	metricsStopTimeout = time.Second
)

// Close stops what newAgent made, in this order: the gRPC server (after a
// short graceful stop) and the metrics endpoint, so nothing new comes in;
// the sandbox, which kills anything still running and removes its slots,
// cgroups and network table; the code store, the node samplers and the
// Redis client; telemetry last, so the spans of the shutdown are flushed.
// Every step runs whatever failed before it.
func (a *agent) Close() error {
	var errs []error
	stopGRPC(a.grpc, a.admin)
	if a.grpc == nil && a.listener != nil {
		errs = append(errs, a.listener.Close())
	}
	if a.adminEndpoint != nil {
		errs = append(errs, a.adminEndpoint.Close())
	}
	if a.metrics != nil {
		ctx, cancel := context.WithTimeout(context.Background(), metricsStopTimeout)
		errs = append(errs, a.metrics.Close(ctx))
		cancel()
	}
	if a.sandbox != nil {
		errs = append(errs, a.sandbox.Close())
	}
	if a.store != nil {
		errs = append(errs, a.store.Close())
	}
	if a.sampler != nil {
		errs = append(errs, a.sampler.Close())
	}
	if a.ips != nil {
		errs = append(errs, a.ips.Close())
	}
	if a.rdb != nil {
		errs = append(errs, a.rdb.Close())
	}
	if a.tel != nil {
		ctx, cancel := context.WithTimeout(context.Background(), telemetryFlushTimeout)
		errs = append(errs, a.tel.Shutdown(ctx))
		cancel()
	}
	return errors.Join(errs...)
}

// stopGRPC stops servers together, each gracefully for grpcStopTimeout at
// most (a tail that follows an execution holds its stream open).
func stopGRPC(servers ...*grpc.Server) {
	var wg sync.WaitGroup
	stopped := make(chan struct{})
	for _, s := range servers {
		if s != nil {
			wg.Go(s.GracefulStop)
		}
	}
	go func() {
		wg.Wait()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(grpcStopTimeout):
		for _, s := range servers {
			if s != nil {
				s.Stop()
			}
		}
		<-stopped
	}
}

func nodeSample(s *nodeinfo.Sampler) func(context.Context) (telemetry.NodeSample, error) {
	return func(context.Context) (telemetry.NodeSample, error) {
		snap := s.Snapshot()
		return telemetry.NodeSample{
			CPUPercent:       snap.CPUPercent,
			MemoryPercent:    snap.Memory.Percent(),
			MemoryUsedBytes:  snap.Memory.UsedBytes,
			MemoryTotalBytes: snap.Memory.TotalBytes,
		}, nil
	}
}

func addrOf(s *telemetry.HTTPServer) string {
	if s == nil {
		return ""
	}
	return s.Addr().String()
}
