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
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/serverless-fabric/flux-agent/deployments"
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
		logger.Error("flux-agent stopped", "error", err)
		return 1
	}
	return 0
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
}

// serve runs the agent until ctx is cancelled (a signal), then shuts down.
func serve(ctx context.Context, cfg Config, logger *slog.Logger) (err error) {
	host, _ := os.Hostname()
	tel, err := telemetry.Setup(ctx, cfg.telemetryConfig(version, host, logger))
	if err != nil {
		return fmt.Errorf("telemetry: %w", err)
	}
	tel.SetGlobal()
	defer func() {
		flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), telemetryFlushTimeout)
		defer cancel()
		err = errors.Join(err, tel.Shutdown(flushCtx))
	}()

	redisOpts := cfg.RedisOptions()
	redisOpts.ClientName = "flux-agent:" + cfg.AgentID
	rdb := redis.NewUniversalClient(redisOpts)
	defer rdb.Close()
	if err := telemetry.InstrumentRedis(rdb, tel.TracerProvider); err != nil {
		return fmt.Errorf("redis tracing: %w", err)
	}

	redisAddrs := func(ctx context.Context) ([]netip.Addr, error) {
		return service.RedisAddresses(ctx, rdb, redisOpts.Addrs)
	}
	sb, err := sandbox.New(cfg.sandboxConfig(logger, redisAddrs))
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	defer sb.Close()

	store, err := deployments.Open(cfg.AppsDir, cfg.deployOptions(logger))
	if err != nil {
		return fmt.Errorf("apps_dir: %w", err)
	}
	defer store.Close()

	sampler, err := nodeinfo.NewSampler("/proc", 0, logger)
	if err != nil {
		return fmt.Errorf("node figures: %w", err)
	}
	defer sampler.Close()
	ips := nodeinfo.StartIPs(cfg.Network.NodePrivateIP, cfg.Network.NodePublicIP, cfg.Network.PublicIPURL,
		&http.Client{Timeout: nodeinfo.DefaultPublicIPTimeout}, logger)
	defer ips.Close()

	svcOpts := cfg.serviceLimits()
	svcOpts.AgentID, svcOpts.Version = cfg.AgentID, version
	svcOpts.Redis, svcOpts.Sandbox, svcOpts.Deployments = rdb, sb, store
	svcOpts.Node, svcOpts.IPs = sampler, ips
	svcOpts.Metrics, svcOpts.Tracer, svcOpts.Logger = tel.Metrics, tel.TracerProvider, logger
	svc, err := service.New(svcOpts)
	if err != nil {
		return err
	}

	serverOpts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxSendMsgSize(maxMessageBytes),
		grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(tel.TracerProvider),
			otelgrpc.WithMeterProvider(tel.MeterProvider),
			otelgrpc.WithPropagators(tel.Propagator),
		)),
	}
	if cfg.TLS.Enabled {
		tlsCfg, err := cfg.TLSServerConfig()
		if err != nil {
			return err
		}
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	server := grpc.NewServer(serverOpts...)
	fluxpb.RegisterAgentServiceServer(server, svc)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	reflection.Register(server)

	lis, err := net.Listen("tcp", cfg.ListenAddr())
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.ListenAddr(), err)
	}
	var metricsServer *telemetry.HTTPServer
	if cfg.Telemetry.MetricsAddress != "" {
		metricsServer, err = telemetry.ListenHTTP(cfg.Telemetry.MetricsAddress, tel.PrometheusHandler, svc.Ready, logger)
		if err != nil {
			lis.Close()
			return fmt.Errorf("telemetry.metrics_address: %w", err)
		}
	}
	if err := tel.Metrics.ObserveNode(nodeSample(sampler)); err != nil {
		logger.Warn("node metrics not registered", "error", err)
	}
	iso := sb.Isolation()
	if err := tel.Metrics.Isolation(ctx, iso.Cgroup, iso.User, len(iso.Degraded) > 0); err != nil {
		logger.Warn("isolation metric not registered", "error", err)
	}

	settleCtx, cancelSettle := context.WithTimeout(ctx, 10*time.Second)
	if n, err := svc.Settle(settleCtx); err != nil {
		logger.Warn("executions left running by an earlier run were not settled", "error", err)
	} else if n > 0 {
		logger.Warn("marked executions left running by an earlier run as failed", "count", n)
	}
	cancelSettle()

	serveErr := make(chan error, 1)
	go func() { serveErr <- server.Serve(lis) }()
	logger.Info("flux-agent started",
		"version", version, "commit", commit, "agent_id", cfg.AgentID,
		"grpc_address", lis.Addr().String(), "tls", cfg.TLS.Enabled,
		"metrics_address", addrOf(metricsServer), "redis_addr", cfg.RedisAddr.String(),
		"apps_dir", cfg.AppsDir, "max_tasks", svcOpts.MaxTasks,
		"isolation_cgroup", iso.Cgroup, "isolation_user", iso.User, "isolation_degraded", iso.Degraded,
		"node_private_ip", ips.PrivateIP())
	healthServer.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthServer.SetServingStatus(fluxpb.AgentService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	select {
	case <-ctx.Done():
		logger.Info("shutting down", "grace", cfg.ShutdownGrace, "active_tasks", svc.ActiveTasks())
	case err := <-serveErr:
		return fmt.Errorf("grpc server: %w", err)
	}
	// Executions drain first while the server still answers Flux's
	// GetExecution, CancelExecution and HealthCheck (now unhealthy).
	healthServer.Shutdown()
	graceCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownGrace)
	defer cancel()
	svc.Shutdown(graceCtx)
	stopped := make(chan struct{})
	go func() {
		server.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(time.Second):
		server.Stop() // a client holding a stream open must not hold us
		<-stopped
	}
	var shutdownErr error
	if metricsServer != nil {
		closeCtx, cancelClose := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancelClose()
		shutdownErr = metricsServer.Close(closeCtx)
	}
	logger.Info("flux-agent stopped")
	return shutdownErr
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
