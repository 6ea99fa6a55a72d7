package main

import (
	"log/slog"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"github.com/serverless-fabric/flux-agent/service"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

func TestSandboxConfig(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	// base is what the defaults give.
	base := func(change func(*sandbox.Config)) sandbox.Config {
		c := sandbox.Config{
			Name: "agent-1", User: "flux-runner", PidsLimit: 1024, NoFile: 1024, TmpSize: 64 << 20,
			Network: sandbox.NetworkPolicy{Mode: sandbox.NetworkFiltered}, Logger: logger,
		}
		change(&c)
		return c
	}
	tests := []struct {
		name   string
		change func(*Config)
		want   sandbox.Config
	}{
		{"defaults", func(*Config) {}, base(func(*sandbox.Config) {})},
		{
			"pids_limit and tmp_size 0 are the sandbox's none",
			func(c *Config) {
				c.Sandbox.PidsLimit, c.Sandbox.TmpSize = 0, 0
				c.Sandbox.CgroupRoot, c.Sandbox.ScratchDir, c.Sandbox.RunAsUser = "/flux", "/var/tmp/flux", "runner2"
			},
			base(func(s *sandbox.Config) {
				s.PidsLimit, s.TmpSize = sandbox.NoPidsLimit, sandbox.NoTmpSizeLimit
				s.CgroupRoot, s.ScratchDir, s.User = "/flux", "/var/tmp/flux", "runner2"
			}),
		},
		{
			"a fixed uid range",
			func(c *Config) { c.Sandbox.UIDRange = UIDRange{Mode: UIDsFixed, First: 2000000, Count: 1000} },
			base(func(s *sandbox.Config) { s.UIDs = sandbox.UIDRange{First: 2000000, Count: 1000} }),
		},
		{
			"shared uids",
			func(c *Config) { c.Sandbox.UIDRange = UIDRange{Mode: UIDsShared} },
			base(func(s *sandbox.Config) { s.SharedUID = true }),
		},
		{
			"network lists",
			func(c *Config) {
				c.Sandbox.NetworkDeny = []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
				c.Sandbox.NetworkAllow = []sandbox.NetworkException{{Prefix: netip.MustParsePrefix("10.0.0.5/32"), Port: 8125}}
				c.Sandbox.NoFile = 4096
			},
			base(func(s *sandbox.Config) {
				s.Network.Deny = []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
				s.Network.Allow = []sandbox.NetworkException{{Prefix: netip.MustParsePrefix("10.0.0.5/32"), Port: 8125}}
				s.NoFile = 4096
			}),
		},
		{
			"the agent's own files are masked",
			func(c *Config) {
				c.path = "/etc/flux-agent/agent.yaml"
				c.TLS = TLSConfig{Enabled: true, CACert: "/etc/flux-agent/ca.pem", CertFile: "/etc/flux-agent/agent.pem", KeyFile: "/etc/flux-agent/agent-key.pem"}
			},
			base(func(s *sandbox.Config) {
				s.MaskPaths = []string{"/etc/flux-agent/agent.yaml", "/etc/flux-agent/ca.pem", "/etc/flux-agent/agent.pem", "/etc/flux-agent/agent-key.pem"}
			}),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.AgentID = "agent-1"
			tt.change(&cfg)
			got := cfg.sandboxConfig(logger, nil)
			if diff := cmp.Diff(tt.want, got, cmpopts.IgnoreUnexported(sandbox.Config{}),
				cmp.Comparer(func(a, b *slog.Logger) bool { return a == b }),
				cmpopts.IgnoreFields(sandbox.NetworkPolicy{}, "Protected"),
				cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Errorf("sandboxConfig (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDeployOptions(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	cfg := DefaultConfig()
	cfg.Deploy = DeployConfig{MaxBytes: 10 << 20, MaxFiles: 100, MaxRatio: 50, KeepVersions: 3}
	got := cfg.deployOptions(logger)
	want := deployments.Options{Limits: deployments.Limits{MaxBytes: 10 << 20, MaxFiles: 100, MaxRatio: 50}, Keep: 3, Foreign: service.FunctionFiles, Logger: logger}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b *slog.Logger) bool { return a == b })); diff != "" {
		t.Errorf("deployOptions (-want +got):\n%s", diff)
	}
	// keep_versions 0 keeps none; the package reads 0 as its default.
	cfg.Deploy.KeepVersions = 0
	if keep := cfg.deployOptions(logger).Keep; keep >= 0 {
		t.Errorf("keep_versions 0 gave Keep %d, want negative (none)", keep)
	}
}

func TestServiceLimits(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ExecutionTTL, cfg.OutputLimit, cfg.QueueLimit, cfg.Sandbox.KillGrace = time.Hour, 1<<20, 7, 3*time.Second
	got := cfg.serviceLimits()
	want := service.Options{ExecutionTTL: time.Hour, OutputLimit: 1 << 20, MaxTasks: TasksPerCPU * runtime.NumCPU(), QueueLimit: 7, KillGrace: 3 * time.Second,
		DefaultTimeout: DefaultFunctionTimeout, DefaultMemoryBytes: DefaultFunctionMemory}
	if diff := cmp.Diff(want, got, cmpopts.IgnoreUnexported(service.Options{})); diff != "" {
		t.Errorf("serviceLimits (-want +got):\n%s", diff)
	}
	for limit, want := range map[TaskLimit]int{0: 0, 8: 8} {
		cfg.MaxTasks = limit
		if got := cfg.serviceLimits().MaxTasks; got != want {
			t.Errorf("max_tasks %d: MaxTasks %d, want %d (0 stays unlimited)", limit, got, want)
		}
	}
}

func TestTaskLimitResolve(t *testing.T) {
	for _, tt := range []struct {
		limit TaskLimit
		cpus  int
		want  int
	}{
		{TaskLimitAuto, 1, 32}, {TaskLimitAuto, 16, 512}, {TaskLimitAuto, 0, 32}, {0, 16, 0}, {5, 16, 5},
	} {
		if got := tt.limit.Resolve(tt.cpus); got != tt.want {
			t.Errorf("%d on %d CPUs: %d, want %d", tt.limit, tt.cpus, got, tt.want)
		}
	}
}

func TestTelemetryConfig(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	cfg := DefaultConfig()
	cfg.AgentID = "agent-1"
	cfg.Telemetry = TelemetryConfig{OTLPEndpoint: "collector:4318", OTLPProtocol: "http/protobuf", OTLPInsecure: true, MetricsPush: true, MetricsAddress: ""}
	got := cfg.telemetryConfig("1.2.3", "host-1", logger)
	want := telemetry.Config{ServiceVersion: "1.2.3", AgentID: "agent-1", HostName: "host-1", OTLPEndpoint: "collector:4318",
		OTLPProtocol: telemetry.ProtocolHTTPProtobuf, OTLPInsecure: true, MetricsPush: true, Logger: logger}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b *slog.Logger) bool { return a == b })); diff != "" {
		t.Errorf("telemetryConfig (-want +got):\n%s", diff)
	}
}

// Each RedisOptions is the caller's to change: main sets ClientName.
func TestRedisOptionsAreCopies(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.RedisAddr.UnmarshalText([]byte("rediss://u:pw@cache:6380/2")); err != nil {
		t.Fatal(err)
	}
	first := cfg.RedisOptions()
	first.Addrs[0], first.ClientName, first.TLSConfig.ServerName = "other:1", "changed", "changed"
	second := cfg.RedisOptions()
	if second.Addrs[0] != "cache:6380" || second.ClientName != "" || second.TLSConfig.ServerName == "changed" {
		t.Errorf("a change to one RedisOptions reached the next: %+v", second)
	}
	if second.Password != "pw" || second.DB != 2 || !second.ContextTimeoutEnabled {
		t.Errorf("options %+v", second)
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"redis://u:pw@h:1/0":     "redis://u:xxxxx@h:1/0",
		"rediss://:pw@h:1":       "rediss://:xxxxx@h:1",
		"redis://u:p@w@h:1":      "redis://u:xxxxx@h:1",
		"redis://u:pw@a:b:c":     "redis://u:xxxxx@a:b:c", // does not parse; still hidden
		"redis://h:1/0?x=a@b:c":  "redis://h:1/0?x=a@b:c",
		"redis://u@h:1":          "redis://u@h:1",
		"redis://h:1":            "redis://h:1",
		"a:1,b:2":                "a:1,b:2",
		"redis://u:pw@h:1/0#a@b": "redis://u:xxxxx@h:1/0#a@b",
	} {
		if got := redactURL(in); got != want {
			t.Errorf("redactURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestNetworkException(t *testing.T) {
	for _, tt := range []struct {
		in, canonical string
		want          sandbox.NetworkException
	}{
		{"127.0.0.1", "127.0.0.1", sandbox.NetworkException{Prefix: netip.MustParsePrefix("127.0.0.1/32")}},
		{"127.0.0.1:8125", "127.0.0.1:8125", sandbox.NetworkException{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Port: 8125}},
		{"10.0.0.0/8", "10.0.0.0/8", sandbox.NetworkException{Prefix: netip.MustParsePrefix("10.0.0.0/8")}},
		{" 10.0.0.0/8:53 ", "10.0.0.0/8:53", sandbox.NetworkException{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Port: 53}},
		{"::1", "::1", sandbox.NetworkException{Prefix: netip.MustParsePrefix("::1/128")}},
		{"[::1]:9000", "[::1]:9000", sandbox.NetworkException{Prefix: netip.MustParsePrefix("::1/128"), Port: 9000}},
		{"fd00::/8", "fd00::/8", sandbox.NetworkException{Prefix: netip.MustParsePrefix("fd00::/8")}},
		{"[fd00::/8]:53", "[fd00::/8]:53", sandbox.NetworkException{Prefix: netip.MustParsePrefix("fd00::/8"), Port: 53}},
		// Without brackets the last group is the address's, not a port.
		{"fd00::1:53", "fd00::1:53", sandbox.NetworkException{Prefix: netip.MustParsePrefix("fd00::1:53/128")}},
	} {
		var got sandbox.NetworkException
		if err := got.UnmarshalText([]byte(tt.in)); err != nil {
			t.Errorf("%q: %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("%q = %+v, want %+v", tt.in, got, tt.want)
		}
		if s := got.String(); s != tt.canonical {
			t.Errorf("%q prints as %q, want %q", tt.in, s, tt.canonical)
		}
	}
	for _, in := range []string{"", ":80", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:http", "[::1]:", "[]:80", "10.0.0.0/33", "host.example"} {
		var e sandbox.NetworkException
		if err := e.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("%q accepted as %v", in, e)
		}
	}
}

func TestUIDRangeText(t *testing.T) {
	for in, want := range map[string]UIDRange{
		"":                    {Mode: UIDsAuto},
		"auto":                {Mode: UIDsAuto},
		"shared":              {Mode: UIDsShared},
		"100-100":             {Mode: UIDsFixed, First: 100, Count: 1},
		" 2000000 - 2065535 ": {Mode: UIDsFixed, First: 2000000, Count: 65536},
	} {
		var got UIDRange
		if err := got.UnmarshalText([]byte(in)); err != nil || got != want {
			t.Errorf("%q = %+v, %v; want %+v", in, got, err, want)
			continue
		}
		text, _ := got.MarshalText()
		var back UIDRange
		if err := back.UnmarshalText(text); err != nil || back != got {
			t.Errorf("%q prints as %q, which reads back as %+v, %v", in, text, back, err)
		}
	}
}

// YAML aliases stand for what they name; merge keys are not keys of ours.
func TestYAMLAliases(t *testing.T) {
	cfg := DefaultConfig()
	err := cfg.Parse(strings.NewReader("default_timeout: &t 2m\nsandbox:\n  kill_grace: *t\n"))
	if err != nil || cfg.Sandbox.KillGrace != 2*time.Minute {
		t.Errorf("kill_grace %s, %v", cfg.Sandbox.KillGrace, err)
	}
	err = cfg.Parse(strings.NewReader("base: &b {port: 1}\n"))
	if err == nil || !strings.Contains(err.Error(), "base: unknown key") {
		t.Errorf("unknown anchored key: %v", err)
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:50053": true, "127.0.0.2:1": true, "[::1]:50053": true, "localhost:50053": true,
		"0.0.0.0:50053": false, "[::]:50053": false, "10.0.0.5:50053": false, "example.com:1": false, "127.0.0.1": false,
	} {
		if got := isLoopback(addr); got != want {
			t.Errorf("isLoopback(%q) = %v", addr, got)
		}
	}
}
