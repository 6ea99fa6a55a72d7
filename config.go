package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sethvargo/go-envconfig"
	"go.yaml.in/yaml/v3"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// Defaults, written once here; example.agent.yaml and --help show them.
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
	DefaultLogFormat     = "json"
	DefaultLogLevel      = "info"
	envPrefix            = "FLUX_AGENT_"
	// MaxOutputLimit keeps a sync ExecutionResponse under Flux's 50 MiB.
	MaxOutputLimit = 48 << 20
)

// Config is the agent's whole configuration: a YAML file, then environment
// overrides (FLUX_AGENT_ + the env tag). Zero values mean "default" only
// where DefaultConfig says so.
type Config struct {
	AgentID         string        `yaml:"agent_id" env:"AGENT_ID"`
	Port            Port          `yaml:"port" env:"PORT"`
	ListenAddress   string        `yaml:"listen_address" env:"LISTEN_ADDRESS"`
	RedisAddr       string        `yaml:"redis_addr" env:"REDIS_ADDR"`
	RedisMasterName string        `yaml:"redis_master_name" env:"REDIS_MASTER_NAME"`
	AppsDir         string        `yaml:"apps_dir" env:"APPS_DIR"`
	MaxTasks        int           `yaml:"max_tasks" env:"MAX_TASKS"`
	QueueLimit      int           `yaml:"queue_limit" env:"QUEUE_LIMIT"`
	ExecutionTTL    time.Duration `yaml:"execution_ttl" env:"EXECUTION_TTL"`
	OutputLimit     ByteSize      `yaml:"output_limit" env:"OUTPUT_LIMIT"`
	ShutdownGrace   time.Duration `yaml:"shutdown_grace" env:"SHUTDOWN_GRACE"`

	TLS       TLSConfig       `yaml:"tls" env:", prefix=TLS_"`
	Network   NetworkConfig   `yaml:"network" env:", prefix=NETWORK_"`
	Sandbox   SandboxConfig   `yaml:"sandbox" env:", prefix=SANDBOX_"`
	Deploy    DeployConfig    `yaml:"deploy" env:", prefix=DEPLOY_"`
	Telemetry TelemetryConfig `yaml:"telemetry" env:", prefix=TELEMETRY_"`
	Log       LogConfig       `yaml:"log" env:", prefix=LOG_"`

	// dir is the config file's folder; relative paths resolve against it.
	dir string
}

// TLSConfig turns on mutual TLS: Flux's CA signs both sides.
type TLSConfig struct {
	Enabled  bool   `yaml:"enabled" env:"ENABLED"`
	CACert   string `yaml:"ca_cert" env:"CA_CERT"`
	CertFile string `yaml:"cert_file" env:"CERT_FILE"`
	KeyFile  string `yaml:"key_file" env:"KEY_FILE"`
}

// NetworkConfig sets or discovers the IPs given to functions.
type NetworkConfig struct {
	NodePrivateIP string `yaml:"node_private_ip" env:"NODE_PRIVATE_IP"`
	NodePublicIP  string `yaml:"node_public_ip" env:"NODE_PUBLIC_IP"`
	PublicIPURL   string `yaml:"public_ip_url" env:"PUBLIC_IP_URL"`
}

// SandboxConfig controls how executions are isolated.
type SandboxConfig struct {
	RunAsUser  string        `yaml:"run_as_user" env:"RUN_AS_USER"`
	CgroupRoot string        `yaml:"cgroup_root" env:"CGROUP_ROOT"`
	PidsLimit  int64         `yaml:"pids_limit" env:"PIDS_LIMIT"`
	KillGrace  time.Duration `yaml:"kill_grace" env:"KILL_GRACE"`
	ScratchDir string        `yaml:"scratch_dir" env:"SCRATCH_DIR"`
	// UIDRange ("FIRST-LAST") gives each running execution a uid of its
	// own, so functions cannot see or signal each other; empty: all run as
	// run_as_user.
	UIDRange string `yaml:"uid_range" env:"UID_RANGE"`
}

// DeployConfig bounds what one code archive may unpack to.
type DeployConfig struct {
	MaxBytes     ByteSize `yaml:"max_bytes" env:"MAX_BYTES"`
	MaxFiles     int      `yaml:"max_files" env:"MAX_FILES"`
	MaxRatio     int      `yaml:"max_ratio" env:"MAX_RATIO"`
	KeepVersions int      `yaml:"keep_versions" env:"KEEP_VERSIONS"`
}

// TelemetryConfig says where traces and metrics go. The standard OTEL_*
// environment variables apply as well.
type TelemetryConfig struct {
	OTLPEndpoint   string `yaml:"otlp_endpoint" env:"OTLP_ENDPOINT"`
	OTLPProtocol   string `yaml:"otlp_protocol" env:"OTLP_PROTOCOL"`
	OTLPInsecure   bool   `yaml:"otlp_insecure" env:"OTLP_INSECURE"`
	MetricsPush    bool   `yaml:"metrics_push" env:"METRICS_PUSH"`
	MetricsAddress string `yaml:"metrics_address" env:"METRICS_ADDRESS"`
}

// LogConfig sets the structured log's shape.
type LogConfig struct {
	Format string `yaml:"format" env:"FORMAT"`
	Level  string `yaml:"level" env:"LEVEL"`
	// File, when set, receives the log instead of stderr (a Windows
	// service has no stderr anyone reads).
	File string `yaml:"file" env:"FILE"`
}

// DefaultConfig returns the configuration used when nothing is set.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		AgentID:       host,
		Port:          DefaultPort,
		RedisAddr:     DefaultRedisAddr,
		AppsDir:       defaultAppsDir(),
		QueueLimit:    DefaultQueueLimit,
		ExecutionTTL:  DefaultExecutionTTL,
		OutputLimit:   DefaultOutputLimit,
		ShutdownGrace: DefaultShutdownGrace,
		Network:       NetworkConfig{PublicIPURL: DefaultPublicIPURL},
		Sandbox: SandboxConfig{
			RunAsUser: DefaultRunAsUser,
			PidsLimit: sandbox.DefaultPidsLimit,
			KillGrace: sandbox.DefaultKillGrace,
		},
		Deploy: DeployConfig{
			MaxBytes:     deployments.DefaultMaxBytes,
			MaxFiles:     deployments.DefaultMaxFiles,
			MaxRatio:     deployments.DefaultMaxRatio,
			KeepVersions: deployments.DefaultKeep,
		},
		Telemetry: TelemetryConfig{MetricsAddress: telemetry.DefaultMetricsAddress},
		Log:       LogConfig{Format: DefaultLogFormat, Level: DefaultLogLevel},
	}
}

// LoadConfig reads the file named by AGENT_CONFIG (a missing default file is
// fine, a missing named file is not), applies FLUX_AGENT_* overrides and
// validates the result. It has no side effects.
func LoadConfig(ctx context.Context, lookup envconfig.Lookuper) (Config, error) {
	cfg := DefaultConfig()
	path, named := lookup.Lookup("AGENT_CONFIG")
	if !named || path == "" {
		path = DefaultConfigPath
	}
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := cfg.Parse(bytes.NewReader(data)); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", path, err)
		}
	case errors.Is(err, os.ErrNotExist) && !named:
		// Running without a file is fine: defaults and environment.
	default:
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	if abs, err := filepath.Abs(filepath.Dir(path)); err == nil {
		cfg.dir = abs
	}
	if err := envconfig.ProcessWith(ctx, &envconfig.Config{
		Target:           &cfg,
		Lookuper:         envconfig.PrefixLookuper(envPrefix, lookup),
		DefaultOverwrite: true,
	}); err != nil {
		return Config{}, fmt.Errorf("environment (%s*): %w", envPrefix, err)
	}
	applyEmptyEnv(reflect.ValueOf(&cfg).Elem(), envconfig.PrefixLookuper(envPrefix, lookup), "")
	cfg.resolvePaths()
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// Parse decodes YAML over c. Unknown keys and values of the wrong type are
// errors that name the key.
func (c *Config) Parse(r io.Reader) error {
	var doc yaml.Node
	if err := yaml.NewDecoder(r).Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty file
		}
		return fmt.Errorf("parse YAML: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	return decodeStrict(doc.Content[0], reflect.ValueOf(c).Elem(), "")
}

// decodeStrict walks a mapping node into a struct field by field, so that
// every error can say which key it is about.
func decodeStrict(node *yaml.Node, target reflect.Value, path string) error {
	if node.Kind == yaml.ScalarNode && node.Tag == "!!null" {
		return nil
	}
	if node.Kind != yaml.MappingNode {
		where := path
		if where == "" {
			where = "the document"
		}
		return fmt.Errorf("%s: want a mapping of keys, got %s", where, nodeKind(node))
	}
	fields := map[string]reflect.Value{}
	for i := 0; i < target.NumField(); i++ {
		tag := target.Type().Field(i).Tag.Get("yaml")
		if tag != "" && tag != "-" {
			fields[tag] = target.Field(i)
		}
	}
	for i := 0; i+1 < len(node.Content); i += 2 {
		key, value := node.Content[i].Value, node.Content[i+1]
		name := key
		if path != "" {
			name = path + "." + key
		}
		field, ok := fields[key]
		if !ok {
			return fmt.Errorf("%s: unknown key (line %d)", name, node.Content[i].Line)
		}
		if field.Kind() == reflect.Struct {
			if _, custom := field.Addr().Interface().(yaml.Unmarshaler); !custom {
				if err := decodeStrict(value, field, name); err != nil {
					return err
				}
				continue
			}
		}
		if err := value.Decode(field.Addr().Interface()); err != nil {
			return fmt.Errorf("%s: %w", name, unwrapYAMLError(err))
		}
	}
	return nil
}

// applyEmptyEnv sets string fields whose variable is set but empty to "":
// envconfig skips empty values, yet FLUX_AGENT_NETWORK_PUBLIC_IP_URL= must
// be able to turn the lookup off.
func applyEmptyEnv(v reflect.Value, lookup envconfig.Lookuper, prefix string) {
	for i := 0; i < v.NumField(); i++ {
		name, opts, _ := strings.Cut(v.Type().Field(i).Tag.Get("env"), ",")
		field := v.Field(i)
		switch {
		case field.Kind() == reflect.Struct && name == "":
			_, nested, _ := strings.Cut(opts, "prefix=")
			applyEmptyEnv(field, lookup, prefix+strings.TrimSpace(nested))
		case field.Kind() == reflect.String && name != "":
			if val, ok := lookup.Lookup(prefix + name); ok && val == "" {
				field.SetString("")
			}
		}
	}
}

func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return fmt.Sprintf("%q", n.Value)
	default:
		return "something else"
	}
}

// unwrapYAMLError drops yaml's "line N: cannot unmarshal" boilerplate layer
// when it holds exactly one message, since the key is already named.
func unwrapYAMLError(err error) error {
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) == 1 {
		return errors.New(te.Errors[0])
	}
	return err
}

func (c *Config) resolvePaths() {
	for _, p := range []*string{&c.TLS.CACert, &c.TLS.CertFile, &c.TLS.KeyFile, &c.Log.File} {
		if *p != "" && !filepath.IsAbs(*p) && c.dir != "" {
			*p = filepath.Join(c.dir, *p)
		}
	}
}

var agentIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Validate reports the first value that cannot work, naming its key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if !agentIDPattern.MatchString(c.AgentID) {
		bad("agent_id", "%q must be 1-128 letters, digits, '.', '_' or '-' (it names Redis keys)", c.AgentID)
	}
	if c.ListenAddress != "" && net.ParseIP(c.ListenAddress) == nil && c.ListenAddress != "localhost" {
		bad("listen_address", "%q is not an IP address", c.ListenAddress)
	}
	if _, err := c.RedisOptions(); err != nil {
		bad("redis_addr", "%v", err)
	}
	if c.AppsDir == "" {
		bad("apps_dir", "must not be empty")
	}
	if c.MaxTasks < 0 {
		bad("max_tasks", "must be 0 (unlimited) or more, got %d", c.MaxTasks)
	}
	if c.QueueLimit < 0 {
		bad("queue_limit", "must be 0 (no queue) or more, got %d", c.QueueLimit)
	}
	if c.ExecutionTTL < time.Second {
		bad("execution_ttl", "must be at least 1s, got %s", c.ExecutionTTL)
	}
	if c.OutputLimit < 1024 || c.OutputLimit > MaxOutputLimit {
		bad("output_limit", "must be between 1KiB and %s (a sync reply must fit Flux's 50 MiB messages), got %s", ByteSize(MaxOutputLimit), c.OutputLimit)
	}
	if c.ShutdownGrace < 0 {
		bad("shutdown_grace", "must not be negative, got %s", c.ShutdownGrace)
	}
	if c.TLS.Enabled {
		for key, p := range map[string]string{"tls.ca_cert": c.TLS.CACert, "tls.cert_file": c.TLS.CertFile, "tls.key_file": c.TLS.KeyFile} {
			if p == "" {
				bad(key, "must be set when tls.enabled is true")
			}
		}
	}
	for key, ip := range map[string]string{"network.node_private_ip": c.Network.NodePrivateIP, "network.node_public_ip": c.Network.NodePublicIP} {
		if ip != "" && net.ParseIP(ip) == nil {
			bad(key, "%q is not an IP address", ip)
		}
	}
	if u := c.Network.PublicIPURL; u != "" {
		if parsed, err := url.Parse(u); err != nil || (parsed.Scheme != "http" && parsed.Scheme != "https") || parsed.Host == "" {
			bad("network.public_ip_url", "%q is not an http(s) URL (set it empty to disable the lookup)", u)
		}
	}
	if c.Sandbox.PidsLimit < 0 {
		bad("sandbox.pids_limit", "must be 0 (unlimited) or more, got %d", c.Sandbox.PidsLimit)
	}
	if _, err := c.Sandbox.UIDs(); err != nil {
		bad("sandbox.uid_range", "%v", err)
	}
	if c.Sandbox.KillGrace < 0 {
		bad("sandbox.kill_grace", "must not be negative, got %s", c.Sandbox.KillGrace)
	}
	if c.Deploy.MaxBytes <= 0 {
		bad("deploy.max_bytes", "must be positive")
	}
	if c.Deploy.MaxFiles <= 0 {
		bad("deploy.max_files", "must be positive")
	}
	if c.Deploy.MaxRatio <= 0 {
		bad("deploy.max_ratio", "must be positive")
	}
	if c.Deploy.KeepVersions < 0 {
		bad("deploy.keep_versions", "must not be negative")
	}
	switch c.Telemetry.OTLPProtocol {
	case "", "grpc", "http/protobuf":
	default:
		bad("telemetry.otlp_protocol", "%q must be grpc or http/protobuf", c.Telemetry.OTLPProtocol)
	}
	if a := c.Telemetry.MetricsAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad("telemetry.metrics_address", "%q is not host:port (empty disables it)", a)
		}
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		bad("log.format", "%q must be json or text", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q must be debug, info, warn or error", c.Log.Level)
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid config: %w", errors.Join(errs...))
	}
	return nil
}

// UIDs parses uid_range: "FIRST-LAST", both above 0, at most 65536 uids.
func (c SandboxConfig) UIDs() (sandbox.UIDRange, error) {
	if c.UIDRange == "" {
		return sandbox.UIDRange{}, nil
	}
	first, last, ok := strings.Cut(c.UIDRange, "-")
	f, err1 := strconv.ParseUint(strings.TrimSpace(first), 10, 32)
	l, err2 := strconv.ParseUint(strings.TrimSpace(last), 10, 32)
	switch {
	case !ok || err1 != nil || err2 != nil:
		return sandbox.UIDRange{}, fmt.Errorf("%q is not FIRST-LAST (e.g. 2000000-2000999)", c.UIDRange)
	case f == 0 || l < f || l-f >= 1<<16 || l >= 1<<32-1:
		return sandbox.UIDRange{}, fmt.Errorf("%q: want 0 < FIRST <= LAST, at most 65536 uids, below 4294967295", c.UIDRange)
	}
	return sandbox.UIDRange{First: uint32(f), Count: uint32(l - f + 1)}, nil
}

// ListenAddr is the gRPC server's host:port.
func (c *Config) ListenAddr() string {
	return net.JoinHostPort(c.ListenAddress, strconv.Itoa(int(c.Port)))
}

// RedisOptions turns redis_addr into client options: a redis:// or
// rediss:// URL, a bare host:port, or a comma-separated list of host:port
// seeds (a Cluster, or Sentinels when redis_master_name is set).
func (c *Config) RedisOptions() (*redis.UniversalOptions, error) {
	addr := strings.TrimSpace(c.RedisAddr)
	if addr == "" {
		return nil, errors.New("must not be empty")
	}
	if strings.Contains(addr, "://") {
		o, err := redis.ParseURL(addr)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", addr, err)
		}
		return &redis.UniversalOptions{
			Addrs: []string{o.Addr}, Username: o.Username, Password: o.Password,
			DB: o.DB, TLSConfig: o.TLSConfig, MasterName: c.RedisMasterName,
			ClientName: o.ClientName, Protocol: o.Protocol,
			DialTimeout: o.DialTimeout, ReadTimeout: o.ReadTimeout, WriteTimeout: o.WriteTimeout,
			PoolSize: o.PoolSize, MinIdleConns: o.MinIdleConns, MaxRetries: o.MaxRetries,
			// Deadlines of the agent's contexts (health checks, final
			// writes) must bound socket reads too.
			ContextTimeoutEnabled: true,
		}, nil
	}
	var addrs []string
	for _, a := range strings.Split(addr, ",") {
		a = strings.TrimSpace(a)
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			return nil, fmt.Errorf("%q is neither a redis:// URL nor host:port", a)
		}
		addrs = append(addrs, a)
	}
	return &redis.UniversalOptions{Addrs: addrs, MasterName: c.RedisMasterName, ContextTimeoutEnabled: true}, nil
}

// TLSServerConfig is the mTLS setup Flux expects: our certificate, a
// required client certificate signed by the CA, TLS 1.2+, ALPN h2 (set by
// grpc's credentials).
func (c *Config) TLSServerConfig() (*tls.Config, error) {
	certPEM, err := os.ReadFile(c.TLS.CertFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file: %w", err)
	}
	keyPEM, err := os.ReadFile(c.TLS.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.key_file: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file %s with tls.key_file %s: %w", c.TLS.CertFile, c.TLS.KeyFile, err)
	}
	caPEM, err := os.ReadFile(c.TLS.CACert)
	if err != nil {
		return nil, fmt.Errorf("tls.ca_cert: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls.ca_cert: %s holds no PEM certificate", c.TLS.CACert)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"h2"},
	}, nil
}

// Port accepts a quoted string ("50052", as Flux writes it) or a number.
type Port uint16

// UnmarshalYAML implements yaml.Unmarshaler.
func (p *Port) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want a port number, got %s", nodeKind(n))
	}
	if n.Value == "" {
		return errors.New("empty; want a port number")
	}
	return p.EnvDecode(n.Value)
}

// EnvDecode implements envconfig.Decoder.
// An empty value leaves the port as it is (envconfig also calls decoders
// of zero-valued fields whose variable is unset).
func (p *Port) EnvDecode(s string) error {
	if s == "" {
		return nil
	}
	v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil {
		return fmt.Errorf("%q is not a port number (0-65535)", s)
	}
	*p = Port(v)
	return nil
}

// ByteSize is a size in bytes written as a number or with a unit
// (KiB, MiB, GiB; KB, MB, GB).
type ByteSize int64

var byteUnits = []struct {
	suffix string
	factor int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want a size, got %s", nodeKind(n))
	}
	if n.Value == "" {
		return errors.New("empty; want a size")
	}
	return b.EnvDecode(n.Value)
}

// EnvDecode implements envconfig.Decoder.
// An empty value leaves the size as it is.
func (b *ByteSize) EnvDecode(s string) error {
	if s == "" {
		return nil
	}
	num, factor := strings.TrimSpace(s), int64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(num, u.suffix) {
			num, factor = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.factor
			break
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/factor {
		return fmt.Errorf("%q is not a size (e.g. 16MiB or 1048576)", s)
	}
	*b = ByteSize(v * factor)
	return nil
}

// MarshalYAML implements yaml.Marshaler: sizes print as they are written.
func (b ByteSize) MarshalYAML() (any, error) { return b.String(), nil }

// String shows the size the way it is best written.
func (b ByteSize) String() string {
	for _, u := range []struct {
		suffix string
		factor int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if int64(b) >= u.factor && int64(b)%u.factor == 0 {
			return fmt.Sprintf("%d%s", int64(b)/u.factor, u.suffix)
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// redactedRedisAddr hides a password in a redis:// URL.
func redactedRedisAddr(addr string) string {
	if u, err := url.Parse(addr); err == nil && u.User != nil {
		return u.Redacted()
	}
	return addr
}

// printConfig shows the effective configuration, secrets hidden, for
// check-config: as YAML made from the Config itself, so no key can be
// left out, and the output is a valid config file.
func printConfig(w io.Writer, cfg Config) error {
	cfg.RedisAddr = redactedRedisAddr(cfg.RedisAddr)
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("render config: %w", err)
	}
	fmt.Fprintln(w, "# configuration is valid; effective values:")
	_, err = w.Write(data)
	return err
}
