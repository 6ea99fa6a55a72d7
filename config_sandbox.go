package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// Sandbox defaults this package owns until the sandbox does.
const (
	// DefaultTmpSize bounds each execution's private /tmp, /var/tmp and
	// /dev/shm together (one tmpfs, whose pages also count against the
	// execution's memory limit).
	DefaultTmpSize = 64 << 20
	// DefaultNoFile is the RLIMIT_NOFILE of functions: what ordinary
	// programs need, far below the agent's own (the unit's 65536), so that
	// a function cannot hold the descriptors the agent needs.
	DefaultNoFile = 1024
	// maxNoFile is fs.nr_open's default, above which setrlimit fails.
	maxNoFile = 1 << 20
	// minNoFile leaves room for stdio and a runtime's own descriptors.
	minNoFile = 16
)

// SandboxConfig controls how executions are isolated.
type SandboxConfig struct {
	RunAsUser  string        `yaml:"run_as_user"`
	CgroupRoot string        `yaml:"cgroup_root"`
	PidsLimit  int64         `yaml:"pids_limit"`
	KillGrace  time.Duration `yaml:"kill_grace"`
	ScratchDir string        `yaml:"scratch_dir"`
	UIDRange   UIDRange      `yaml:"uid_range"`
	// TmpSize is the size of each execution's private /tmp, /var/tmp and
	// /dev/shm (one tmpfs); 0: no size limit.
	TmpSize ByteSize `yaml:"tmp_size"`
	// NoFile is the RLIMIT_NOFILE (soft and hard) functions run with.
	NoFile int `yaml:"nofile"`
	// Network is what functions may reach.
	Network NetworkMode `yaml:"network"`
	// NetworkDeny adds destinations to what the filtered policy refuses.
	NetworkDeny []netip.Prefix `yaml:"network_deny"`
	// NetworkAllow opens destinations the filtered policy would refuse
	// (a sidecar on the node), and wins over NetworkDeny.
	NetworkAllow []NetworkException `yaml:"network_allow"`
}

func defaultSandboxConfig() SandboxConfig {
	return SandboxConfig{
		RunAsUser: DefaultRunAsUser,
		PidsLimit: sandbox.DefaultPidsLimit,
		KillGrace: sandbox.DefaultKillGrace,
		UIDRange:  UIDRange{Mode: UIDsAuto},
		TmpSize:   DefaultTmpSize,
		NoFile:    DefaultNoFile,
		Network:   NetworkFiltered,
	}
}

func (s SandboxConfig) validate() []error {
	var errs []error
	if s.PidsLimit < 0 {
		errs = append(errs, keyError("pids_limit", "must be 0 (unlimited) or more, got %d", s.PidsLimit))
	}
	if s.KillGrace < 0 {
		errs = append(errs, keyError("kill_grace", "must not be negative, got %s", s.KillGrace))
	}
	if err := s.UIDRange.check(); err != nil {
		errs = append(errs, keyError("uid_range", "%v", err))
	}
	if s.TmpSize != 0 && s.TmpSize < 1<<20 {
		errs = append(errs, keyError("tmp_size", "must be 0 (no size limit) or at least 1MiB, got %s", s.TmpSize))
	}
	if s.NoFile < minNoFile || s.NoFile > maxNoFile {
		errs = append(errs, keyError("nofile", "must be between %d and %d, got %d", minNoFile, maxNoFile, s.NoFile))
	}
	if err := new(NetworkMode).UnmarshalText([]byte(s.Network)); err != nil {
		errs = append(errs, keyError("network", "%v", err))
	}
	for i, p := range s.NetworkDeny {
		if err := checkPrefix(p); err != nil {
			errs = append(errs, keyError("network_deny", "item %d: %v", i+1, err))
		}
	}
	for i, e := range s.NetworkAllow {
		if err := checkPrefix(e.Prefix); err != nil {
			errs = append(errs, keyError("network_allow", "item %d: %v", i+1, err))
		}
	}
	// The lists refine the filter; with none or host there is no filter,
	// and a list that silently does nothing would mislead.
	if s.Network != NetworkFiltered {
		if len(s.NetworkDeny) > 0 {
			errs = append(errs, keyError("network_deny", "only applies with sandbox.network: %s (it is %s)", NetworkFiltered, s.Network))
		}
		if len(s.NetworkAllow) > 0 {
			errs = append(errs, keyError("network_allow", "only applies with sandbox.network: %s (it is %s)", NetworkFiltered, s.Network))
		}
	}
	return errs
}

// checkPrefix refuses a prefix with bits set past its length: 10.0.0.1/8
// may mean the network 10.0.0.0/8 or a typo for the host 10.0.0.1/32, and
// a policy must not guess which.
func checkPrefix(p netip.Prefix) error {
	if !p.IsValid() {
		return errors.New("not a valid prefix")
	}
	if p.Masked() != p {
		return fmt.Errorf("%s has bits set past its /%d; write %s for the network", p, p.Bits(), p.Masked())
	}
	return nil
}

// sandboxConfig is the sandbox section in the sandbox's terms: pids_limit 0
// (none) becomes sandbox.NoPidsLimit, a FIRST-LAST uid_range a
// sandbox.UIDRange.
func (c *Config) sandboxConfig(logger *slog.Logger) sandbox.Config {
	pids := c.Sandbox.PidsLimit
	if pids == 0 {
		pids = sandbox.NoPidsLimit
	}
	// auto is resolved from /etc/subuid by the sandbox; until
	// sandbox.Config can say auto, it runs as shared did before.
	var uids sandbox.UIDRange
	if r := c.Sandbox.UIDRange; r.Mode == UIDsFixed {
		uids = sandbox.UIDRange{First: r.First, Count: r.Count}
	}
	return sandbox.Config{
		CgroupRoot: c.Sandbox.CgroupRoot,
		User:       c.Sandbox.RunAsUser,
		UIDs:       uids,
		PidsLimit:  pids,
		ScratchDir: c.Sandbox.ScratchDir,
		Logger:     logger,
	}
}

// UIDRange is sandbox.uid_range: where each running execution's uid comes
// from.
type UIDRange struct {
	Mode UIDMode
	// First and Count are the range, with UIDsFixed.
	First, Count uint32
}

// UIDMode says how executions get their uids.
type UIDMode uint8

// uid_range's modes.
const (
	// UIDsAuto (written "auto" or left empty) takes run_as_user's range
	// in /etc/subuid, found by the sandbox when it starts.
	UIDsAuto UIDMode = iota
	// UIDsShared ("shared") runs every execution as run_as_user's own
	// uid: functions can then read each other's environment and signal
	// each other. Unsafe with tenants who do not trust each other.
	UIDsShared
	// UIDsFixed ("FIRST-LAST") takes uids from First to First+Count-1.
	UIDsFixed
)

// maxUIDs bounds a FIRST-LAST range (the sandbox keeps one flag per uid).
const maxUIDs = 1 << 16

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *UIDRange) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	switch s {
	case "", "auto":
		*r = UIDRange{Mode: UIDsAuto}
		return nil
	case "shared":
		*r = UIDRange{Mode: UIDsShared}
		return nil
	}
	first, last, ok := strings.Cut(s, "-")
	f, err1 := strconv.ParseUint(strings.TrimSpace(first), 10, 32)
	l, err2 := strconv.ParseUint(strings.TrimSpace(last), 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return fmt.Errorf("%q is not auto, shared or FIRST-LAST (e.g. 2000000-2000999)", text)
	}
	if l < f {
		return fmt.Errorf("%q: LAST is below FIRST", text)
	}
	if l-f+1 > maxUIDs {
		return fmt.Errorf("%q: %d uids, at most %d", text, l-f+1, maxUIDs)
	}
	candidate := UIDRange{Mode: UIDsFixed, First: uint32(f), Count: uint32(l - f + 1)}
	if err := candidate.check(); err != nil {
		return fmt.Errorf("%q: %w", text, err)
	}
	*r = candidate
	return nil
}

// check refuses a range the sandbox could not use: uid 0 is root's, and
// 4294967295 is (uid_t)-1, which set*id calls read as "unchanged".
func (r UIDRange) check() error {
	switch r.Mode {
	case UIDsAuto, UIDsShared:
		return nil
	case UIDsFixed:
		if r.First == 0 || r.Count == 0 || r.Count > maxUIDs || uint64(r.First)+uint64(r.Count)-1 >= 1<<32-1 {
			return fmt.Errorf("want 0 < FIRST <= LAST < 4294967295, at most %d uids", maxUIDs)
		}
		return nil
	}
	return fmt.Errorf("unknown mode %d", r.Mode)
}

// MarshalText implements encoding.TextMarshaler.
func (r UIDRange) MarshalText() ([]byte, error) {
	switch r.Mode {
	case UIDsAuto:
		return []byte("auto"), nil
	case UIDsShared:
		return []byte("shared"), nil
	}
	return fmt.Appendf(nil, "%d-%d", r.First, uint64(r.First)+uint64(r.Count)-1), nil
}

// NetworkMode is sandbox.network: what functions may reach.
type NetworkMode string

// sandbox.network's values.
const (
	// NetworkFiltered lets functions reach other hosts and the internet,
	// but not loopback, the node's own addresses, the agent's Redis
	// servers, link-local ranges (cloud metadata) or network_deny; the
	// exceptions are network_allow.
	NetworkFiltered NetworkMode = "filtered"
	// NetworkNone gives functions no network but their own loopback.
	NetworkNone NetworkMode = "none"
	// NetworkHost gives functions the node's network as it is, the
	// agent's Redis and every local service included. Unsafe.
	NetworkHost NetworkMode = "host"
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (m *NetworkMode) UnmarshalText(text []byte) error {
	switch s := NetworkMode(strings.ToLower(strings.TrimSpace(string(text)))); s {
	case NetworkFiltered, NetworkNone, NetworkHost:
		*m = s
		return nil
	}
	return fmt.Errorf("%q must be %s, %s or %s", text, NetworkFiltered, NetworkNone, NetworkHost)
}

// NetworkException is one entry of sandbox.network_allow: an address or
// network, and a port or every port. Written ADDR, ADDR:PORT, CIDR or
// CIDR:PORT; an IPv6 one with a port in brackets: [fd00::1]:8080.
type NetworkException struct {
	Prefix netip.Prefix
	Port   uint16 // 0: every port
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (e *NetworkException) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	dest, port, hasPort := s, "", false
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.Index(s, "]")
		if end < 0 {
			return fmt.Errorf("%q: no closing ]", text)
		}
		dest = s[1:end]
		if rest := s[end+1:]; rest != "" {
			if port, hasPort = strings.CutPrefix(rest, ":"); !hasPort {
				return fmt.Errorf("%q: want [IPv6]:PORT", text)
			}
		}
	case strings.Count(s, ":") == 1: // IPv4 with a port; IPv6 has more colons
		dest, port, hasPort = strings.Cut(s, ":")
	}
	prefix, err := parseDestination(dest)
	if err != nil {
		return fmt.Errorf("%q: %w", text, err)
	}
	var p uint64
	if hasPort {
		if p, err = strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			return fmt.Errorf("%q: port %q is not 1-65535", text, port)
		}
	}
	*e = NetworkException{Prefix: prefix, Port: uint16(p)}
	return nil
}

// parseDestination reads an address (one host) or a CIDR.
func parseDestination(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an address or a CIDR", s)
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an address or a CIDR", s)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q: zones are not supported", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// String writes the exception the way UnmarshalText reads it.
func (e NetworkException) String() string {
	dest := e.Prefix.String()
	if e.Prefix.IsSingleIP() {
		dest = e.Prefix.Addr().String()
	}
	switch {
	case e.Port == 0:
		return dest
	case e.Prefix.Addr().Is6():
		return "[" + dest + "]:" + strconv.Itoa(int(e.Port))
	default:
		return dest + ":" + strconv.Itoa(int(e.Port))
	}
}

// MarshalText implements encoding.TextMarshaler.
func (e NetworkException) MarshalText() ([]byte, error) { return []byte(e.String()), nil }
