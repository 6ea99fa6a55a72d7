package main

import (
	"fmt"
	"github.com/serverless-fabric/flux-agent/sandbox"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// keyCase is a value other than the default for one key, written as an
// operator would write it, and what the key's field must then hold.
type keyCase struct {
	key  string
	text string
	want any
	// also names keys the value needs to be valid (tls.enabled needs files).
	also map[string]string
}

// keyCases has one entry per key of the Config (a test checks that none is
// missing).
var keyCases = []keyCase{
	{key: "agent_id", text: "agent-7f3a", want: "agent-7f3a"},
	{key: "port", text: "6000", want: Port(6000)},
	{key: "listen_address", text: "127.0.0.1", want: "127.0.0.1"},
	{key: "redis_addr", text: "rediss://cache:6380", want: mustRedisAddr("rediss://cache:6380")},
	{key: "redis_master_name", text: "mymaster", want: "mymaster"},
	{key: "apps_dir", text: "/srv/flux/apps", want: "/srv/flux/apps"},
	{key: "max_tasks", text: "8", want: TaskLimit(8)},
	{key: "queue_limit", text: "10", want: 10},
	{key: "default_timeout", text: "90s", want: 90 * time.Second},
	{key: "default_memory", text: "1GiB", want: ByteSize(1 << 30)},
	{key: "execution_ttl", text: "1h", want: time.Hour},
	{key: "output_limit", text: "1MiB", want: ByteSize(1 << 20)},
	{key: "shutdown_grace", text: "20s", want: 20 * time.Second},
	{key: "tls.enabled", text: "true", want: true, also: map[string]string{
		"tls.ca_cert": "/etc/flux/ca.pem", "tls.cert_file": "/etc/flux/agent.pem", "tls.key_file": "/etc/flux/agent-key.pem"}},
	{key: "tls.ca_cert", text: "/etc/flux/ca.pem", want: "/etc/flux/ca.pem"},
	{key: "tls.cert_file", text: "/etc/flux/agent.pem", want: "/etc/flux/agent.pem"},
	{key: "tls.key_file", text: "/etc/flux/agent-key.pem", want: "/etc/flux/agent-key.pem"},
	{key: "network.node_private_ip", text: "10.0.0.5", want: "10.0.0.5"},
	{key: "network.node_public_ip", text: "203.0.113.7", want: "203.0.113.7"},
	{key: "network.public_ip_url", text: "", want: ""},
	{key: "sandbox.run_as_user", text: "runner2", want: "runner2"},
	{key: "sandbox.cgroup_root", text: "/flux", want: "/flux"},
	{key: "sandbox.pids_limit", text: "0", want: int64(0)},
	{key: "sandbox.kill_grace", text: "5s", want: 5 * time.Second},
	{key: "sandbox.scratch_dir", text: "/var/tmp/flux", want: "/var/tmp/flux"},
	{key: "sandbox.uid_range", text: "2000000-2000999", want: UIDRange{Mode: UIDsFixed, First: 2000000, Count: 1000}},
	{key: "sandbox.tmp_size", text: "128MiB", want: ByteSize(128 << 20)},
	{key: "sandbox.nofile", text: "4096", want: 4096},
	{key: "sandbox.network", text: "none", want: sandbox.NetworkNone},
	{key: "sandbox.network_deny", text: "10.0.0.0/8, fd00::/8", want: []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}},
	{key: "sandbox.network_allow", text: "127.0.0.1:8125, [::1]:9000, 10.1.0.0/16:53, fd00::5", want: []sandbox.NetworkException{
		{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Port: 8125},
		{Prefix: netip.MustParsePrefix("::1/128"), Port: 9000},
		{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Port: 53},
		{Prefix: netip.MustParsePrefix("fd00::5/128")},
	}},
	{key: "deploy.max_bytes", text: "10MB", want: ByteSize(10_000_000)},
	{key: "deploy.max_files", text: "100", want: 100},
	{key: "deploy.max_ratio", text: "50", want: 50},
	{key: "deploy.keep_versions", text: "0", want: 0},
	{key: "telemetry.otlp_endpoint", text: "http://localhost:4317", want: "http://localhost:4317"},
	{key: "telemetry.otlp_protocol", text: "http/protobuf", want: OTLPProtocol("http/protobuf")},
	{key: "telemetry.otlp_insecure", text: "true", want: true},
	{key: "telemetry.metrics_push", text: "yes", want: true},
	{key: "telemetry.metrics_address", text: "", want: ""},
	{key: "log.format", text: "text", want: LogFormat("text")},
	{key: "log.level", text: "debug", want: LogLevel("debug")},
	{key: "log.file", text: "/var/log/flux-agent.log", want: "/var/log/flux-agent.log"},
	{key: "admin.socket", text: "/run/flux-agent/other.sock", want: "/run/flux-agent/other.sock"},
	{key: "admin.address", text: "127.0.0.1:6000", want: "127.0.0.1:6000", also: map[string]string{"admin.token_file": `C:\flux\admin.token`}},
	{key: "admin.token_file", text: `C:\flux\admin.token`, want: `C:\flux\admin.token`},
}

func keyCaseFor(t *testing.T, key string) keyCase {
	t.Helper()
	for _, c := range keyCases {
		if c.key == key {
			return c
		}
	}
	t.Fatalf("keyCases has no entry for %s", key)
	return keyCase{}
}

// fieldOf returns the value of key in c.
func fieldOf(t *testing.T, c *Config, key string) any {
	t.Helper()
	for _, s := range settings(c) {
		if s.key == key {
			return s.field.Interface()
		}
	}
	t.Fatalf("no key %s", key)
	return nil
}

// yamlFor writes key: 'text' in YAML, nested under its sections.
func yamlFor(key, text string) string {
	parts := strings.Split(key, ".")
	var b strings.Builder
	for i, p := range parts[:len(parts)-1] {
		fmt.Fprintf(&b, "%s%s:\n", strings.Repeat("  ", i), p)
	}
	fmt.Fprintf(&b, "%s%s: '%s'\n", strings.Repeat("  ", len(parts)-1), parts[len(parts)-1], strings.ReplaceAll(text, "'", "''"))
	return b.String()
}

func envFor(key string) string {
	return (setting{key: key}).envName()
}

func TestKeyCasesCoverEveryKey(t *testing.T) {
	cfg := DefaultConfig()
	var keys []string
	for _, s := range settings(&cfg) {
		keys = append(keys, s.key)
		c := keyCaseFor(t, s.key)
		if cmp.Equal(c.want, s.field.Interface(), configCmp...) {
			t.Errorf("%s: the case's value is the default; it would prove nothing", s.key)
		}
	}
	if len(keys) != len(keyCases) {
		t.Errorf("%d keys, %d cases", len(keys), len(keyCases))
	}
}

// Every key takes the same value from the file and from the environment,
// and that value is valid on its own.
func TestEveryKeyFromFileAndEnvironment(t *testing.T) {
	for _, tc := range keyCases {
		t.Run(tc.key, func(t *testing.T) {
			fromFile := DefaultConfig()
			if err := fromFile.Parse(strings.NewReader(yamlFor(tc.key, tc.text))); err != nil {
				t.Fatalf("file: %v", err)
			}
			if diff := cmp.Diff(tc.want, fieldOf(t, &fromFile, tc.key), configCmp...); diff != "" {
				t.Errorf("from the file (-want +got):\n%s", diff)
			}

			env := map[string]string{"AGENT_CONFIG": writeConfig(t, ""), envFor(tc.key): tc.text}
			for k, v := range tc.also {
				env[envFor(k)] = v
			}
			fromEnv, err := load(t, env)
			switch {
			case foreignKeys[tc.key]:
				if err == nil || !strings.Contains(err.Error(), tc.key+":") {
					t.Errorf("%s is not this OS's key, yet the error is %v", tc.key, err)
				}
			case err != nil:
				t.Fatalf("environment: %v", err)
			default:
				if diff := cmp.Diff(tc.want, fieldOf(t, &fromEnv, tc.key), configCmp...); diff != "" {
					t.Errorf("from the environment (-want +got):\n%s", diff)
				}
			}
		})
	}
}

// badValues are values each key must refuse, and a word of the reason.
var badValues = []struct {
	key, text, why string
}{
	{"agent_id", "a{b}", "names Redis keys"},
	{"port", "abc", "not a port number"},
	{"port", "70000", "not a port number"},
	{"port", "", "empty"},
	{"listen_address", "10.0.0", "not an IP address"},
	{"redis_addr", "", "must not be empty"},
	{"redis_addr", "localhost", "neither a redis:// URL nor host:port"},
	{"redis_addr", "redis://u:pw@a:b:c", "redis://u:xxxxx@a:b:c"}, // the password hidden in the error too
	{"apps_dir", "", "must not be empty"},
	{"max_tasks", "-1", "want auto"},
	{"max_tasks", "many", "want auto"},
	{"max_tasks", "1.5", "want auto"},
	{"queue_limit", "-1", "0 (no queue) or more"},
	{"queue_limit", "x", "not a whole number"},
	{"default_timeout", "soon", "not a duration"},
	{"default_timeout", "-1s", "0 (none) or at least 1s"},
	{"default_timeout", "500ms", "0 (none) or at least 1s"},
	{"default_memory", "lots", "not a size"},
	{"default_memory", "1000", "0 (none) or at least 1MiB"},
	{"execution_ttl", "0s", "at least 1s"},
	{"output_limit", "100", "between 1KiB and 48MiB"},
	{"output_limit", "64MiB", "between 1KiB and 48MiB"},
	{"shutdown_grace", "soon", "not a duration"},
	{"shutdown_grace", "-1s", "must not be negative"},
	{"shutdown_grace", "34s", "set it to 33s or less"},
	{"tls.enabled", "maybe", "not true or false"},
	{"network.node_private_ip", "10.0.0", "not an IP address"},
	{"network.node_public_ip", "::g", "not an IP address"},
	{"network.public_ip_url", "ftp://x", "not an http(s) URL"},
	{"sandbox.pids_limit", "-1", "0 (unlimited) or more"},
	{"sandbox.pids_limit", "x", "not a whole number"},
	{"sandbox.kill_grace", "-1s", "must not be negative"},
	{"sandbox.uid_range", "200-100", "LAST is below FIRST"},
	{"sandbox.uid_range", "0-100", "0 < FIRST"},
	{"sandbox.uid_range", "many", "not auto, shared or FIRST-LAST"},
	{"sandbox.uid_range", "1-70000", "at most 65536"},
	{"sandbox.uid_range", "4294967290-4294967295", "< 4294967295"},
	{"sandbox.tmp_size", "1000", "at least 1MiB"},
	{"sandbox.tmp_size", "big", "not a size"},
	{"sandbox.nofile", "0", "between 16 and 1048576"},
	{"sandbox.nofile", "2000000", "between 16 and 1048576"},
	{"sandbox.network", "open", `want "filtered", "none" or "host"`},
	{"sandbox.network", "", `want "filtered", "none" or "host"`},
	{"sandbox.network_deny", "10.0.0.5", "item 1"},
	{"sandbox.network_deny", "10.0.0.0/8,,fd00::/8", "item 2 is empty"},
	{"sandbox.network_deny", "10.0.0.1/8", "write 10.0.0.0/8"},
	{"sandbox.network_allow", "10.0.0.1:0", "want 1-65535"},
	{"sandbox.network_allow", "[::1", "missing ]"},
	{"sandbox.network_allow", "[::1]80", "want :port after ]"},
	{"sandbox.network_allow", "localhost:80", "not an address or CIDR"},
	{"sandbox.network_allow", "fe80::1%eth0", "zones are not supported"},
	{"sandbox.network_allow", "10.1.2.3/16:53", "did you mean 10.1.0.0/16"},
	{"deploy.max_bytes", "0", "must be positive"},
	{"deploy.max_files", "0", "must be positive"},
	{"deploy.max_ratio", "0", "must be positive"},
	{"deploy.keep_versions", "-1", "must not be negative"},
	{"telemetry.otlp_protocol", "http/json", "must be grpc or http/protobuf"},
	{"telemetry.otlp_insecure", "maybe", "not true or false"},
	{"telemetry.metrics_address", "9464", "not host:port"},
	{"log.format", "xml", "must be json or text"},
	{"log.level", "verbose", "must be debug, info, warn or error"},
	{"admin.socket", "/run/" + strings.Repeat("x", 120), ""},
	{"admin.address", "0.0.0.0:50053", ""},
}

// Bad values are refused from the file and from the environment, and the
// error names the key (and the variable, for the environment).
func TestBadValuesNameTheKey(t *testing.T) {
	for _, tc := range badValues {
		t.Run(tc.key+"="+tc.text, func(t *testing.T) {
			names := regexp.MustCompile(`(^|\s|\()` + regexp.QuoteMeta(tc.key) + `(:|\))`)
			check := func(source string, err error) {
				t.Helper()
				switch {
				case err == nil:
					t.Errorf("%s: %q accepted", source, tc.text)
				case !names.MatchString(err.Error()):
					t.Errorf("%s: error does not name %s: %v", source, tc.key, err)
				case !strings.Contains(err.Error(), tc.why):
					t.Errorf("%s: error does not say %q: %v", source, tc.why, err)
				}
			}
			_, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, yamlFor(tc.key, tc.text))})
			check("file", err)
			_, err = load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, ""), envFor(tc.key): tc.text})
			check("environment", err)
			if err != nil && strings.Contains(err.Error(), "environment") && !strings.Contains(err.Error(), envFor(tc.key)) {
				t.Errorf("environment: error does not name %s: %v", envFor(tc.key), err)
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("DefaultConfig is not valid: %v", err)
	}
	for key, want := range map[string]any{
		"max_tasks":             TaskLimitAuto,
		"default_timeout":       15 * time.Minute,
		"default_memory":        ByteSize(512 << 20),
		"shutdown_grace":        30 * time.Second,
		"sandbox.network":       sandbox.NetworkFiltered,
		"sandbox.network_deny":  []netip.Prefix(nil),
		"sandbox.network_allow": []sandbox.NetworkException(nil),
		"sandbox.tmp_size":      ByteSize(64 << 20),
		"sandbox.nofile":        1024,
		"sandbox.uid_range":     UIDRange{Mode: UIDsAuto},
	} {
		if diff := cmp.Diff(want, fieldOf(t, &cfg, key), configCmp...); diff != "" {
			t.Errorf("%s (-want +got):\n%s", key, diff)
		}
	}
	if got := cfg.Admin; got != defaultAdminConfig() {
		t.Errorf("admin = %+v", got)
	}
}

// An empty variable empties a string or a list the file set; a key with
// no value in the file keeps its default.
func TestEmptyValues(t *testing.T) {
	file := "network:\n  public_ip_url: http://ip.example\nsandbox:\n  network_deny: [10.0.0.0/8]\n  uid_range: 100-200\nport:\nadmin:\n  socket: ''\n"
	cfg, err := load(t, map[string]string{
		"AGENT_CONFIG":                     writeConfig(t, file),
		"FLUX_AGENT_NETWORK_PUBLIC_IP_URL": "",
		"FLUX_AGENT_SANDBOX_NETWORK_DENY":  "",
		"FLUX_AGENT_SANDBOX_UID_RANGE":     "",
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network.PublicIPURL != "" || cfg.Sandbox.NetworkDeny != nil || cfg.Sandbox.UIDRange.Mode != UIDsAuto {
		t.Errorf("empty variables not applied: url %q deny %v uids %+v", cfg.Network.PublicIPURL, cfg.Sandbox.NetworkDeny, cfg.Sandbox.UIDRange)
	}
	if cfg.Port != DefaultPort {
		t.Errorf("port with no value = %d, want the default", cfg.Port)
	}
	if cfg.Admin.Socket != "" {
		t.Errorf("admin.socket '' = %q, want disabled", cfg.Admin.Socket)
	}
}

func TestListsInYAML(t *testing.T) {
	file := `sandbox:
  network_deny:
    - 10.0.0.0/8
    - fd00::/8
  network_allow: &allow
    - 127.0.0.1:8125
    - '[::1]:9000'
`
	cfg := DefaultConfig()
	if err := cfg.Parse(strings.NewReader(file)); err != nil {
		t.Fatal(err)
	}
	want := keyCaseFor(t, "sandbox.network_deny").want
	if diff := cmp.Diff(want, cfg.Sandbox.NetworkDeny, configCmp...); diff != "" {
		t.Errorf("network_deny (-want +got):\n%s", diff)
	}
	if len(cfg.Sandbox.NetworkAllow) != 2 || cfg.Sandbox.NetworkAllow[1].Port != 9000 {
		t.Errorf("network_allow = %v", cfg.Sandbox.NetworkAllow)
	}

	for name, file := range map[string]string{
		"a mapping in the list": "sandbox:\n  network_deny:\n    - a: 1\n",
		"a list for a value":    "sandbox:\n  nofile: [1, 2]\n",
		"a mapping for a list":  "sandbox:\n  network_deny:\n    a: 1\n",
	} {
		cfg := DefaultConfig()
		err := cfg.Parse(strings.NewReader(file))
		if err == nil || !strings.Contains(err.Error(), "sandbox.") {
			t.Errorf("%s: error %v", name, err)
		}
	}
}

func TestNetworkListsNeedTheFilter(t *testing.T) {
	for _, mode := range []string{"none", "host"} {
		file := "sandbox:\n  network: " + mode + "\n  network_deny: [10.0.0.0/8]\n  network_allow: [127.0.0.1:53]\n"
		_, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, file)})
		if err == nil || !strings.Contains(err.Error(), "sandbox.network_deny: only applies with sandbox.network: filtered") ||
			!strings.Contains(err.Error(), "sandbox.network_allow: only applies") {
			t.Errorf("%s: %v", mode, err)
		}
	}
}

// The stop budget: shutdown_grace plus the final records' time fits
// the unit's TimeoutStopSec, which the constant must match.
func TestShutdownGraceFitsTheStopTimeout(t *testing.T) {
	unit, err := os.ReadFile("packaging/flux-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("\nTimeoutStopSec=%ds\n", int(stopTimeout.Seconds())); !strings.Contains(string(unit), want) {
		t.Errorf("packaging/flux-agent.service lacks %q: stopTimeout is out of step", strings.TrimSpace(want))
	}
	for grace, ok := range map[string]bool{"0s": true, "30s": true, "33s": true, "33.5s": false, "1m": false} {
		_, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, "shutdown_grace: "+grace+"\n")})
		if (err == nil) != ok {
			t.Errorf("shutdown_grace %s: %v", grace, err)
		}
	}
}

func TestLogSettingsFollowTheLogger(t *testing.T) {
	cfg, err := load(t, map[string]string{
		"AGENT_CONFIG":         writeConfig(t, "log:\n  format: TEXT\n  level: Warning\n"),
		"FLUX_AGENT_LOG_LEVEL": "",
	})
	if err != nil {
		t.Fatal(err)
	}
	// An empty level is the logger's default, info.
	if cfg.Log.Format != "text" || cfg.Log.Level != "info" {
		t.Errorf("log = %+v", cfg.Log)
	}
	cfg.Log.Level = "warn"
	var out strings.Builder
	logger, err := cfg.Log.newLogger(&out)
	if err != nil {
		t.Fatal(err)
	}
	logger.Info("hidden")
	logger.Warn("shown")
	if got := out.String(); strings.Contains(got, "hidden") || !strings.HasPrefix(got, "time=") || !strings.Contains(got, "msg=shown") {
		t.Errorf("log output %q", got)
	}
}

func TestRelativeLogFileResolvesAgainstTheFile(t *testing.T) {
	cfg, err := load(t, map[string]string{"AGENT_CONFIG": writeConfig(t, ""), "FLUX_AGENT_LOG_FILE": "agent.log"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log.File != cfg.dir+string(os.PathSeparator)+"agent.log" {
		t.Errorf("log.file = %q (dir %s)", cfg.Log.File, cfg.dir)
	}
}

// --help lists every key with its variable.
func TestHelpListsEveryKey(t *testing.T) {
	var out strings.Builder
	writeDefaults(&out)
	cfg := DefaultConfig()
	for _, s := range settings(&cfg) {
		if !regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(s.key) + ` .* ` + s.envName() + `$`).MatchString(out.String()) {
			t.Errorf("--help lacks %s", s.key)
		}
	}
	if !regexp.MustCompile(`(?m)^  max_tasks +auto +FLUX_AGENT_MAX_TASKS$`).MatchString(out.String()) {
		t.Errorf("--help does not show max_tasks' default:\n%s", out.String())
	}
}

// example.agent.yaml and README's Configuration section name every key.
func TestEveryKeyIsDocumented(t *testing.T) {
	example, err := os.ReadFile("example.agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	section := string(readme)
	start, end := strings.Index(section, "## Configuration"), strings.Index(section, "## The gRPC API")
	if start < 0 || end < start {
		t.Fatal("README.md: no Configuration section before The gRPC API")
	}
	section = section[start:end]
	cfg := DefaultConfig()
	for _, s := range settings(&cfg) {
		leaf := s.key[strings.LastIndex(s.key, ".")+1:]
		// In the example, under its section, perhaps commented out (keys
		// whose default depends on the OS).
		if !regexp.MustCompile(`(?m)^\s*#?\s*` + regexp.QuoteMeta(leaf) + `:`).Match(example) {
			t.Errorf("example.agent.yaml does not show %s", s.key)
		}
		if !strings.Contains(section, "`"+s.key+"`") {
			t.Errorf("README.md's Configuration table does not name `%s`", s.key)
		}
	}
}
