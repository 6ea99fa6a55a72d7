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
	"os"
	"runtime"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sethvargo/go-envconfig"
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
	cfg, err := LoadConfig(ctx, envconfig.OsLookuper())
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
	logger, err := telemetry.NewLogger(logOut, cfg.Log.Format, cfg.Log.Level)
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
	d := DefaultConfig()
	fmt.Fprintf(w, `flux-agent runs Serverless Fabric functions as sandboxed native processes for Flux.

Usage:
  flux-agent [--version]      run the agent (or print its version)
  flux-agent check-config     validate the configuration and print the effective values

Configuration: the YAML file named by AGENT_CONFIG (default ./%s), then
environment variables %s<KEY> (e.g. %sPORT, %sREDIS_ADDR, %sTLS_ENABLED).
Defaults: port %d, redis_addr %s, apps_dir %s, execution_ttl %s,
output_limit %s, shutdown_grace %s, queue_limit %d, metrics_address %s.
See example.agent.yaml for every key.
`, DefaultConfigPath, envPrefix, envPrefix, envPrefix, envPrefix,
		d.Port, d.RedisAddr, d.AppsDir, d.ExecutionTTL, d.OutputLimit, d.ShutdownGrace, d.QueueLimit, d.Telemetry.MetricsAddress)
}

// serve runs the agent until ctx is cancelled (a signal), then shuts down.
func serve(ctx context.Context, cfg Config, logger *slog.Logger) (err error) {
	host, _ := os.Hostname()
	tel, err := telemetry.Setup(ctx, telemetry.Config{
		ServiceVersion: version,
		AgentID:        cfg.AgentID,
		HostName:       host,
		OTLPEndpoint:   cfg.Telemetry.OTLPEndpoint,
		OTLPProtocol:   cfg.Telemetry.OTLPProtocol,
		OTLPInsecure:   cfg.Telemetry.OTLPInsecure,
		MetricsPush:    cfg.Telemetry.MetricsPush,
		Logger:         logger,
	})
	if err != nil {
		return fmt.Errorf("telemetry: %w", err)
	}
	tel.SetGlobal()
	defer func() {
		flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), telemetryFlushTimeout)
		defer cancel()
		err = errors.Join(err, tel.Shutdown(flushCtx))
	}()

	redisOpts, err := cfg.RedisOptions()
	if err != nil {
		return fmt.Errorf("redis_addr: %w", err)
	}
	redisOpts.ClientName = "flux-agent:" + cfg.AgentID
	rdb := redis.NewUniversalClient(redisOpts)
	defer rdb.Close()
	if err := telemetry.InstrumentRedis(rdb, tel.TracerProvider); err != nil {
		return fmt.Errorf("redis tracing: %w", err)
	}

	pidsLimit := cfg.Sandbox.PidsLimit
	if pidsLimit == 0 {
		pidsLimit = sandbox.NoPidsLimit // 0 in the config means unlimited
	}
	uids, _ := cfg.Sandbox.UIDs() // validated with the config
	sb, err := sandbox.New(sandbox.Config{
		CgroupRoot: cfg.Sandbox.CgroupRoot,
		User:       cfg.Sandbox.RunAsUser,
		UIDs:       uids,
		PidsLimit:  pidsLimit,
		ScratchDir: cfg.Sandbox.ScratchDir,
		Logger:     logger,
	})
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	defer sb.Close()

	store, err := deployments.Open(cfg.AppsDir, deployments.Options{
		Limits: deployments.Limits{
			MaxBytes: int64(cfg.Deploy.MaxBytes),
			MaxFiles: cfg.Deploy.MaxFiles,
			MaxRatio: cfg.Deploy.MaxRatio,
		},
		Keep:   keepVersions(cfg.Deploy.KeepVersions),
		Logger: logger,
	})
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

	svc, err := service.New(service.Options{
		AgentID:      cfg.AgentID,
		Version:      version,
		Redis:        rdb,
		ExecutionTTL: cfg.ExecutionTTL,
		OutputLimit:  int64(cfg.OutputLimit),
		MaxTasks:     cfg.MaxTasks,
		QueueLimit:   cfg.QueueLimit,
		KillGrace:    cfg.Sandbox.KillGrace,
		Sandbox:      sb,
		Deployments:  store,
		Node:         sampler,
		IPs:          ips,
		Metrics:      tel.Metrics,
		Tracer:       tel.TracerProvider,
		Logger:       logger,
	})
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
		"metrics_address", addrOf(metricsServer), "redis_addr", redactedRedisAddr(cfg.RedisAddr),
		"apps_dir", cfg.AppsDir, "max_tasks", cfg.MaxTasks,
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

// keepVersions maps deploy.keep_versions (0 = keep none) to
// deployments.Options.Keep (0 = its default, negative = none).
func keepVersions(n int) int {
	if n == 0 {
		return -1
	}
	return n
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
