package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// Bounds of sandbox.nofile.
const (
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
	Network sandbox.NetworkMode `yaml:"network"`
	// NetworkDeny adds destinations to what the filtered policy refuses.
	NetworkDeny []netip.Prefix `yaml:"network_deny"`
	// NetworkAllow opens destinations the filtered policy would refuse
	// (a sidecar on the node), and wins over NetworkDeny.
	NetworkAllow []sandbox.NetworkException `yaml:"network_allow"`
}

func defaultSandboxConfig() SandboxConfig {
	return SandboxConfig{
		RunAsUser: DefaultRunAsUser,
		PidsLimit: sandbox.DefaultPidsLimit,
		KillGrace: sandbox.DefaultKillGrace,
		UIDRange:  UIDRange{Mode: UIDsAuto},
		TmpSize:   sandbox.DefaultTmpSize,
		NoFile:    sandbox.DefaultNoFile,
		Network:   sandbox.NetworkFiltered,
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
	if _, err := sandbox.ParseNetworkMode(string(s.Network)); err != nil {
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
	if s.Network != sandbox.NetworkFiltered {
		if len(s.NetworkDeny) > 0 {
			errs = append(errs, keyError("network_deny", "only applies with sandbox.network: %s (it is %s)", sandbox.NetworkFiltered, s.Network))
		}
		if len(s.NetworkAllow) > 0 {
			errs = append(errs, keyError("network_allow", "only applies with sandbox.network: %s (it is %s)", sandbox.NetworkFiltered, s.Network))
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

// sandboxConfig is the sandbox section in the sandbox's terms: pids_limit
// 0 (none) becomes sandbox.NoPidsLimit, tmp_size 0 (no size limit)
// sandbox.NoTmpSizeLimit, uid_range auto a zero range (the sandbox reads the
// runner's /etc/subuid entry) and shared SharedUID. protected resolves the
// Redis servers no function may reach. The agent's own files (this config,
// its TLS files, its log) are masked from functions.
func (c *Config) sandboxConfig(logger *slog.Logger, protected func(context.Context) ([]netip.Addr, error)) sandbox.Config {
	pids := c.Sandbox.PidsLimit
	if pids == 0 {
		pids = sandbox.NoPidsLimit
	}
	tmp := int64(c.Sandbox.TmpSize)
	if tmp == 0 {
		tmp = sandbox.NoTmpSizeLimit
	}
	cfg := sandbox.Config{
		Name:       c.AgentID,
		CgroupRoot: c.Sandbox.CgroupRoot,
		User:       c.Sandbox.RunAsUser,
		PidsLimit:  pids,
		NoFile:     uint64(c.Sandbox.NoFile),
		TmpSize:    tmp,
		Network: sandbox.NetworkPolicy{
			Mode:      c.Sandbox.Network,
			Deny:      c.Sandbox.NetworkDeny,
			Allow:     c.Sandbox.NetworkAllow,
			Protected: protected,
		},
		ScratchDir: c.Sandbox.ScratchDir,
		Logger:     logger,
	}
	switch r := c.Sandbox.UIDRange; r.Mode {
	case UIDsFixed:
		cfg.UIDs = sandbox.UIDRange{First: r.First, Count: r.Count}
	case UIDsShared:
		cfg.SharedUID = true
	}
	for _, p := range []string{c.path, c.TLS.CACert, c.TLS.CertFile, c.TLS.KeyFile, c.Log.File, c.Admin.TokenFile} {
		if p != "" {
			cfg.MaskPaths = append(cfg.MaskPaths, p)
		}
	}
	return cfg
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
