package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// writeConfig writes a config file into a fresh folder and returns its path.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// load runs LoadConfig with env as the whole environment.
func load(t *testing.T, env map[string]string) (Config, error) {
	t.Helper()
	return LoadConfig(func(key string) (string, bool) {
		v, ok := env[key]
		return v, ok
	})
}

// configCmp compares Configs: a RedisAddr by what was written.
var configCmp = []cmp.Option{
	cmp.AllowUnexported(Config{}),
	cmp.Comparer(func(a, b RedisAddr) bool { return a.text == b.text }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
}

func TestLoadConfigFluxFile(t *testing.T) {
	// The agent.yaml Flux writes, byte for byte in shape: quoted port.
	path := writeConfig(t, `agent_id: agent-7f3a
port: "50052"
redis_addr: "redis://10.0.0.2:6379"
tls:
  enabled: true
  ca_cert: /home/admin/flux-agent/tls/ca.pem
  cert_file: /home/admin/flux-agent/tls/agent.pem
  key_file: /home/admin/flux-agent/tls/agent-key.pem
`)
	cfg, err := load(t, map[string]string{"AGENT_CONFIG": path})
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.AgentID = "agent-7f3a"
	want.RedisAddr = mustRedisAddr("redis://10.0.0.2:6379")
	want.TLS = TLSConfig{
		Enabled:  true,
		CACert:   "/home/admin/flux-agent/tls/ca.pem",
		CertFile: "/home/admin/flux-agent/tls/agent.pem",
		KeyFile:  "/home/admin/flux-agent/tls/agent-key.pem",
	}
	want.dir = filepath.Dir(path)
	want.path = path
	if diff := cmp.Diff(want, cfg, configCmp...); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
}

func TestExampleConfigShowsTheDefaults(t *testing.T) {
	data, err := os.ReadFile("example.agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	got := DefaultConfig()
	got.Port = 1 // must be set back by the file
	if err := got.Parse(strings.NewReader(string(data))); err != nil {
		t.Fatalf("example.agent.yaml: %v", err)
	}
	if diff := cmp.Diff(DefaultConfig(), got, configCmp...); diff != "" {
		t.Errorf("example.agent.yaml differs from DefaultConfig (-default +example):\n%s", diff)
	}
}

func TestLoadConfigValues(t *testing.T) {
	tests := []struct {
		name  string
		file  string
		env   map[string]string
		check func(t *testing.T, c Config)
	}{
		{
			name: "bare number port",
			file: "port: 6000\n",
			check: func(t *testing.T, c Config) {
				if c.Port != 6000 {
					t.Errorf("port = %d", c.Port)
				}
			},
		},
		{
			name: "environment wins over the file",
			file: "port: 6000\nredis_addr: localhost:1\ntls:\n  enabled: false\n",
			env: map[string]string{
				"FLUX_AGENT_PORT": "7000", "FLUX_AGENT_REDIS_ADDR": "rediss://cache:6380",
				"FLUX_AGENT_OUTPUT_LIMIT": "1MiB", "FLUX_AGENT_SHUTDOWN_GRACE": "5s",
				"FLUX_AGENT_NETWORK_PUBLIC_IP_URL": "", "FLUX_AGENT_MAX_TASKS": "8",
			},
			check: func(t *testing.T, c Config) {
				if c.Port != 7000 || c.RedisAddr.String() != "rediss://cache:6380" || c.OutputLimit != 1<<20 ||
					c.ShutdownGrace != 5*time.Second || c.Network.PublicIPURL != "" || c.MaxTasks != 8 {
					t.Errorf("env not applied: %+v", c)
				}
			},
		},
		{
			name: "relative TLS paths resolve against the file's folder",
			file: "tls:\n  enabled: true\n  ca_cert: tls/ca.pem\n  cert_file: /abs/agent.pem\n  key_file: agent-key.pem\n",
			check: func(t *testing.T, c Config) {
				if !filepath.IsAbs(c.TLS.CACert) || !strings.HasSuffix(c.TLS.CACert, "/tls/ca.pem") ||
					c.TLS.CertFile != "/abs/agent.pem" || filepath.Dir(c.TLS.KeyFile) != c.dir {
					t.Errorf("tls paths: %+v (dir %s)", c.TLS, c.dir)
				}
			},
		},
		{
			name: "sizes and durations",
			file: "output_limit: 2048\nexecution_ttl: 90m\ndeploy:\n  max_bytes: 10MB\n",
			check: func(t *testing.T, c Config) {
				if c.OutputLimit != 2048 || c.ExecutionTTL != 90*time.Minute || c.Deploy.MaxBytes != 10_000_000 {
					t.Errorf("got %v %v %v", c.OutputLimit, c.ExecutionTTL, c.Deploy.MaxBytes)
				}
			},
		},
		{
			name: "uid range",
			file: "sandbox:\n  uid_range: 2000000-2000999\n",
			check: func(t *testing.T, c Config) {
				if r := c.Sandbox.UIDRange; r != (UIDRange{Mode: UIDsFixed, First: 2000000, Count: 1000}) {
					t.Errorf("uid range %+v", r)
				}
			},
		},
		{
			name:  "empty file",
			file:  "",
			check: func(t *testing.T, c Config) {},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"AGENT_CONFIG": writeConfig(t, tt.file)}
			for k, v := range tt.env {
				env[k] = v
			}
			cfg, err := load(t, env)
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, cfg)
		})
	}
}

func TestLoadConfigErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name string
		file string
		env  map[string]string
		want string // the key the error must name
	}{
		{"unknown top-level key", "prot: 1\n", nil, "prot: unknown key"},
		{"unknown nested key", "tls:\n  enable: true\n", nil, "tls.enable: unknown key"},
		{"port not a number", "port: abc\n", nil, "port:"},
		{"port out of range", "port: 70000\n", nil, "port:"},
		{"port a list", "port: [1]\n", nil, "port:"},
		{"port empty", "port: ''\n", nil, "port:"},
		{"bad duration", "shutdown_grace: soon\n", nil, "shutdown_grace:"},
		{"bad size", "output_limit: lots\n", nil, "output_limit:"},
		{"negative max_tasks", "max_tasks: -1\n", nil, "max_tasks:"},
		{"tls without files", "tls:\n  enabled: true\n", nil, "tls.ca_cert:"},
		{"bad redis url", "redis_addr: 'redis://a:b:c:d'\n", nil, "redis_addr:"},
		{"redis without port", "redis_addr: localhost\n", nil, "redis_addr:"},
		{"bad private ip", "network:\n  node_private_ip: 10.0.0\n", nil, "network.node_private_ip:"},
		{"bad public ip url", "network:\n  public_ip_url: ftp://x\n", nil, "network.public_ip_url:"},
		{"agent id with braces", "agent_id: 'a{b}'\n", nil, "agent_id:"},
		{"log format", "log:\n  format: xml\n", nil, "log.format:"},
		{"uid range backwards", "sandbox:\n  uid_range: 200-100\n", nil, "sandbox.uid_range:"},
		{"uid range from 0", "sandbox:\n  uid_range: 0-100\n", nil, "sandbox.uid_range:"},
		{"uid range junk", "sandbox:\n  uid_range: many\n", nil, "sandbox.uid_range:"},
		{"tls not a mapping", "tls: yes\n", nil, "tls: want a mapping"},
		{"bad env port", "", map[string]string{"FLUX_AGENT_PORT": "x"}, "FLUX_AGENT_PORT (port):"},
		{"bad env bool", "", map[string]string{"FLUX_AGENT_TLS_ENABLED": "maybe"}, "FLUX_AGENT_TLS_ENABLED (tls.enabled):"},
		{"empty env port", "", map[string]string{"FLUX_AGENT_PORT": ""}, "FLUX_AGENT_PORT (port): empty"},
		{"key set twice", "port: 1\nport: 2\n", nil, "port: set twice (first on line 1) (line 2)"},
		{"section a list", "sandbox: [1]\n", nil, "sandbox: want a mapping of keys, got a list"},
		{"value a mapping", "max_tasks:\n  a: 1\n", nil, "max_tasks: want a single value, got a mapping"},
		{"not yaml", "port: [\n", nil, "parse YAML"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"AGENT_CONFIG": writeConfig(t, tt.file)}
			for k, v := range tt.env {
				env[k] = v
			}
			_, err := load(t, env)
			if err == nil {
				t.Fatalf("no error; want one naming %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not name %q", err, tt.want)
			}
		})
	}
}

func TestLoadConfigFiles(t *testing.T) {
	t.Run("missing named file is an error", func(t *testing.T) {
		_, err := load(t, map[string]string{"AGENT_CONFIG": filepath.Join(t.TempDir(), "nope.yaml")})
		if err == nil {
			t.Fatal("no error for a missing AGENT_CONFIG file")
		}
	})
	t.Run("missing default file is fine", func(t *testing.T) {
		t.Chdir(t.TempDir())
		cfg, err := load(t, nil)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Port != DefaultPort {
			t.Errorf("port = %d", cfg.Port)
		}
	})
}

func TestRedisOptions(t *testing.T) {
	tests := []struct {
		addr, master string
		wantAddrs    []string
		wantTLS      bool
	}{
		{"redis://localhost:6379", "", []string{"localhost:6379"}, false},
		{"rediss://user:pw@cache:6380/2", "", []string{"cache:6380"}, true},
		{"127.0.0.1:7000", "", []string{"127.0.0.1:7000"}, false},
		{"a:1, b:2,c:3", "", []string{"a:1", "b:2", "c:3"}, false},
		{"s1:26379,s2:26379", "mymaster", []string{"s1:26379", "s2:26379"}, false},
	}
	for _, tt := range tests {
		c := DefaultConfig()
		if err := c.RedisAddr.UnmarshalText([]byte(tt.addr)); err != nil {
			t.Errorf("%s: %v", tt.addr, err)
			continue
		}
		c.RedisMasterName = tt.master
		o := c.RedisOptions()
		if diff := cmp.Diff(tt.wantAddrs, o.Addrs); diff != "" {
			t.Errorf("%s: addrs (-want +got):\n%s", tt.addr, diff)
		}
		if (o.TLSConfig != nil) != tt.wantTLS || o.MasterName != tt.master {
			t.Errorf("%s: tls %v master %q", tt.addr, o.TLSConfig != nil, o.MasterName)
		}
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]ByteSize{"0": 0, "1024": 1024, "16MiB": 16 << 20, "2 GiB": 2 << 30, "5KB": 5000, "3M": 3 << 20} {
		var b ByteSize
		if err := b.UnmarshalText([]byte(in)); err != nil || b != want {
			t.Errorf("%q: got %d, %v; want %d", in, b, err, want)
		}
	}
	for _, in := range []string{" ", "-1", "1.5MiB", "MiB", "9999999999GiB"} {
		var b ByteSize
		if err := b.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
	if s := ByteSize(16 << 20).String(); s != "16MiB" {
		t.Errorf("String = %s", s)
	}
}

// check-config's output is the whole effective config, as a config file:
// parsed back it gives the same values, every key set to something other
// than its default, with the Redis password hidden.
func TestPrintConfigRoundTrips(t *testing.T) {
	cfg := DefaultConfig()
	for _, s := range settings(&cfg) {
		if err := s.set(keyCaseFor(t, s.key).text); err != nil {
			t.Fatalf("%s: %v", s.key, err)
		}
	}
	if err := cfg.RedisAddr.UnmarshalText([]byte("redis://user:s3cret@cache:6380/1")); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if err := printConfig(&out, cfg); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "s3cret") {
		t.Errorf("the Redis password is shown:\n%s", out.String())
	}
	back := DefaultConfig()
	if err := back.Parse(strings.NewReader(out.String())); err != nil {
		t.Fatalf("output is not a valid config: %v\n%s", err, out.String())
	}
	want := cfg
	want.RedisAddr = mustRedisAddr(cfg.RedisAddr.String())
	if diff := cmp.Diff(want, back, configCmp...); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
}
