package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"time"

	"github.com/serverless-fabric/flux-agent/service"
)

// Defaults, written once here or in the package that owns the value;
// example.agent.yaml and --help show them.
const (
	DefaultConfigPath    = "agent.yaml"
	DefaultPort          = 50052
	DefaultRedisAddr     = "redis://localhost:6379"
	DefaultPublicIPURL   = "https://api.ipify.org"
	DefaultExecutionTTL  = 24 * time.Hour
	DefaultOutputLimit   = 16 << 20
	DefaultShutdownGrace = 30 * time.Second
	DefaultQueueLimit    = 1000
	DefaultRunAsUser     = "flux-runner"
	// DefaultFunctionTimeout (default_timeout) ends functions that set no
	// timeout_seconds: one that never returns would otherwise hold its
	// slot, memory and uid for good. 15 minutes is the longest run common
	// serverless platforms allow.
	DefaultFunctionTimeout = 15 * time.Minute
	// DefaultFunctionMemory (default_memory) caps functions that set no
	// memory_mb, so that a runaway one is OOM-killed alone instead of
	// driving the node into the kernel's OOM killer, which may pick the
	// agent.
	DefaultFunctionMemory = 512 << 20
	envPrefix             = "FLUX_AGENT_"
	// MaxOutputLimit keeps a sync ExecutionResponse under Flux's 50 MiB.
	MaxOutputLimit = 48 << 20
)

// The shutdown has to fit the service manager's patience: after
// shutdown_grace, what is still running is killed and its final record
// written (service.ShutdownAfterGrace at most, whatever Redis does), the
// servers stop and telemetry is flushed, all before stopTimeout, when
// systemd (TimeoutStopSec= in packaging/flux-agent.service) kills the agent
// outright.
const (
	stopTimeout       = 45 * time.Second
	finalRecordBudget = service.ShutdownAfterGrace + grpcStopTimeout + metricsStopTimeout + telemetryFlushTimeout
)

// Config is the agent's whole configuration: a YAML file, then environment
// overrides (FLUX_AGENT_ + the key upper-cased, "." as "_"). Zero values
// mean "default" only where DefaultConfig says so.
type Config struct {
	AgentID         string    `yaml:"agent_id"`
	Port            Port      `yaml:"port"`
	ListenAddress   string    `yaml:"listen_address"`
	RedisAddr       RedisAddr `yaml:"redis_addr"`
	RedisMasterName string    `yaml:"redis_master_name"`
	AppsDir         string    `yaml:"apps_dir"`
	MaxTasks        TaskLimit `yaml:"max_tasks"`
	QueueLimit      int       `yaml:"queue_limit"`
	// DefaultTimeout and DefaultMemory apply to functions whose own
	// timeout_seconds or memory_mb is 0; 0 here means none.
	DefaultTimeout time.Duration `yaml:"default_timeout"`
	DefaultMemory  ByteSize      `yaml:"default_memory"`
	ExecutionTTL   time.Duration `yaml:"execution_ttl"`
	OutputLimit    ByteSize      `yaml:"output_limit"`
	ShutdownGrace  time.Duration `yaml:"shutdown_grace"`

	TLS       TLSConfig       `yaml:"tls"`
	Network   NetworkConfig   `yaml:"network"`
	Sandbox   SandboxConfig   `yaml:"sandbox"`
	Deploy    DeployConfig    `yaml:"deploy"`
	Telemetry TelemetryConfig `yaml:"telemetry"`
	Log       LogConfig       `yaml:"log"`
	Admin     AdminConfig     `yaml:"admin"`

	// dir is the config file's folder; relative paths resolve against it.
	dir string
	// path is the config file read, "" when none was.
	path string
}

// DefaultConfig returns the configuration used when nothing is set.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		AgentID:        host,
		Port:           DefaultPort,
		RedisAddr:      mustRedisAddr(DefaultRedisAddr),
		AppsDir:        defaultAppsDir(),
		MaxTasks:       TaskLimitAuto,
		QueueLimit:     DefaultQueueLimit,
		DefaultTimeout: DefaultFunctionTimeout,
		DefaultMemory:  DefaultFunctionMemory,
		ExecutionTTL:   DefaultExecutionTTL,
		OutputLimit:    DefaultOutputLimit,
		ShutdownGrace:  DefaultShutdownGrace,
		Network:        defaultNetworkConfig(),
		Sandbox:        defaultSandboxConfig(),
		Deploy:         defaultDeployConfig(),
		Telemetry:      defaultTelemetryConfig(),
		Log:            defaultLogConfig(),
		Admin:          defaultAdminConfig(),
	}
}

// LoadConfig reads the file named by AGENT_CONFIG (a missing default file is
// fine, a missing named file is not), applies FLUX_AGENT_* overrides found
// by lookup (os.LookupEnv in production) and validates the result. It has
// no side effects.
func LoadConfig(lookup func(key string) (string, bool)) (Config, error) {
	cfg := DefaultConfig()
	path, named := lookup("AGENT_CONFIG")
	if !named || path == "" {
		path = DefaultConfigPath
	}
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := cfg.Parse(bytes.NewReader(data)); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", path, err)
		}
		if abs, err := filepath.Abs(path); err == nil {
			cfg.path = abs
		}
	case errors.Is(err, os.ErrNotExist) && !named:
		// Running without a file is fine: defaults and environment.
	default:
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	if abs, err := filepath.Abs(filepath.Dir(path)); err == nil {
		cfg.dir = abs
	}
	if err := cfg.applyEnv(lookup); err != nil {
		return Config{}, fmt.Errorf("environment (%s*): %w", envPrefix, err)
	}
	cfg.resolvePaths()
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// resolvePaths makes the files the agent opens itself relative to the
// config file's folder, where Flux's bootstrap puts them.
func (c *Config) resolvePaths() {
	for _, p := range []*string{&c.TLS.CACert, &c.TLS.CertFile, &c.TLS.KeyFile, &c.Log.File, &c.Admin.Socket, &c.Admin.TokenFile} {
		if *p != "" && !filepath.IsAbs(*p) && c.dir != "" {
			*p = filepath.Join(c.dir, *p)
		}
	}
}

// Validate reports every value that cannot work, each error naming its key.
func (c *Config) Validate() error {
	errs := c.validate()
	for _, section := range []struct {
		name string
		errs []error
	}{
		{"tls", c.TLS.validate()},
		{"network", c.Network.validate()},
		{"sandbox", c.Sandbox.validate()},
		{"deploy", c.Deploy.validate()},
		{"telemetry", c.Telemetry.validate()},
		{"log", c.Log.validate()},
		{"admin", c.Admin.validate()},
	} {
		for _, err := range section.errs {
			errs = append(errs, fmt.Errorf("%s.%w", section.name, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid config: %w", errors.Join(errs...))
	}
	return nil
}

// keyError says what is wrong with the value of key (relative to its
// section; Validate adds the section's name).
func keyError(key, format string, args ...any) error {
	return fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...))
}

var agentIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// validate checks the top-level keys.
func (c *Config) validate() []error {
	var errs []error
	if !agentIDPattern.MatchString(c.AgentID) {
		errs = append(errs, keyError("agent_id", "%q must be 1-128 letters, digits, '.', '_' or '-' (it names Redis keys)", c.AgentID))
	}
	if c.ListenAddress != "" && net.ParseIP(c.ListenAddress) == nil && c.ListenAddress != "localhost" {
		errs = append(errs, keyError("listen_address", "%q is not an IP address", c.ListenAddress))
	}
	if c.RedisAddr.IsZero() {
		errs = append(errs, keyError("redis_addr", "must not be empty"))
	}
	if c.AppsDir == "" {
		errs = append(errs, keyError("apps_dir", "must not be empty"))
	}
	if c.MaxTasks < 0 && c.MaxTasks != TaskLimitAuto {
		errs = append(errs, keyError("max_tasks", "must be auto, 0 (unlimited) or more, got %d", c.MaxTasks))
	}
	if c.QueueLimit < 0 {
		errs = append(errs, keyError("queue_limit", "must be 0 (no queue) or more, got %d", c.QueueLimit))
	}
	if c.DefaultTimeout != 0 && c.DefaultTimeout < time.Second {
		errs = append(errs, keyError("default_timeout", "must be 0 (none) or at least 1s, got %s", c.DefaultTimeout))
	}
	if c.DefaultMemory != 0 && c.DefaultMemory < 1<<20 {
		errs = append(errs, keyError("default_memory", "must be 0 (none) or at least 1MiB, got %s", c.DefaultMemory))
	}
	if c.ExecutionTTL < time.Second {
		errs = append(errs, keyError("execution_ttl", "must be at least 1s, got %s", c.ExecutionTTL))
	}
	if c.OutputLimit < 1024 || c.OutputLimit > MaxOutputLimit {
		errs = append(errs, keyError("output_limit", "must be between 1KiB and %s (a sync reply must fit Flux's 50 MiB messages), got %s", ByteSize(MaxOutputLimit), c.OutputLimit))
	}
	switch {
	case c.ShutdownGrace < 0:
		errs = append(errs, keyError("shutdown_grace", "must not be negative, got %s", c.ShutdownGrace))
	case c.ShutdownGrace+finalRecordBudget > stopTimeout:
		errs = append(errs, keyError("shutdown_grace", "%s and the %s final records may take do not fit the %s the service manager waits for a stop (TimeoutStopSec); set it to %s or less",
			c.ShutdownGrace, finalRecordBudget, stopTimeout, stopTimeout-finalRecordBudget))
	}
	return errs
}

// ListenAddr is the gRPC server's host:port.
func (c *Config) ListenAddr() string {
	return net.JoinHostPort(c.ListenAddress, strconv.Itoa(int(c.Port)))
}

// serviceLimits is the part of service.Options the config decides: max_tasks
// auto becomes a number from the CPUs, 0 stays unlimited. The caller adds
// the service's collaborators.
func (c *Config) serviceLimits() service.Options {
	return service.Options{
		ExecutionTTL:       c.ExecutionTTL,
		OutputLimit:        int64(c.OutputLimit),
		MaxTasks:           c.MaxTasks.Resolve(runtime.NumCPU()),
		QueueLimit:         c.QueueLimit,
		KillGrace:          c.Sandbox.KillGrace,
		DefaultTimeout:     c.DefaultTimeout,
		DefaultMemoryBytes: int64(c.DefaultMemory),
	}
}
