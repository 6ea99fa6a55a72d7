package main

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// SandboxConfig controls how executions are isolated.
type SandboxConfig struct {
	RunAsUser  string        `yaml:"run_as_user"`
	CgroupRoot string        `yaml:"cgroup_root"`
	PidsLimit  int64         `yaml:"pids_limit"`
	KillGrace  time.Duration `yaml:"kill_grace"`
	ScratchDir string        `yaml:"scratch_dir"`
	UIDRange   UIDRange      `yaml:"uid_range"`
}

func defaultSandboxConfig() SandboxConfig {
	return SandboxConfig{
		RunAsUser: DefaultRunAsUser,
		PidsLimit: sandbox.DefaultPidsLimit,
		KillGrace: sandbox.DefaultKillGrace,
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
	return errs
}

// sandboxConfig is the sandbox section in the sandbox's terms: pids_limit 0
// (none) becomes sandbox.NoPidsLimit.
func (c *Config) sandboxConfig(logger *slog.Logger) sandbox.Config {
	pids := c.Sandbox.PidsLimit
	if pids == 0 {
		pids = sandbox.NoPidsLimit
	}
	return sandbox.Config{
		CgroupRoot: c.Sandbox.CgroupRoot,
		User:       c.Sandbox.RunAsUser,
		UIDs:       sandbox.UIDRange{First: c.Sandbox.UIDRange.First, Count: c.Sandbox.UIDRange.Count},
		PidsLimit:  pids,
		ScratchDir: c.Sandbox.ScratchDir,
		Logger:     logger,
	}
}

// UIDRange is sandbox.uid_range, "FIRST-LAST": each running execution gets
// a uid of its own from it, so functions cannot see or signal each other.
// Empty (Count 0): every execution runs as run_as_user.
type UIDRange struct {
	First, Count uint32
}

// maxUIDs bounds a range (the sandbox keeps one flag per uid).
const maxUIDs = 1 << 16

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *UIDRange) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	if s == "" {
		*r = UIDRange{}
		return nil
	}
	first, last, ok := strings.Cut(s, "-")
	f, err1 := strconv.ParseUint(strings.TrimSpace(first), 10, 32)
	l, err2 := strconv.ParseUint(strings.TrimSpace(last), 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return fmt.Errorf("%q is not FIRST-LAST (e.g. 2000000-2000999)", text)
	}
	if l < f {
		return fmt.Errorf("%q: LAST is below FIRST", text)
	}
	if l-f+1 > maxUIDs {
		return fmt.Errorf("%q: %d uids, at most %d", text, l-f+1, maxUIDs)
	}
	candidate := UIDRange{First: uint32(f), Count: uint32(l - f + 1)}
	if err := candidate.check(); err != nil {
		return fmt.Errorf("%q: %w", text, err)
	}
	*r = candidate
	return nil
}

// check refuses a range the sandbox could not use: uid 0 is root's, and
// 4294967295 is (uid_t)-1, which set*id calls read as "unchanged".
func (r UIDRange) check() error {
	if r.Count == 0 {
		return nil
	}
	if r.First == 0 || r.Count > maxUIDs || uint64(r.First)+uint64(r.Count)-1 >= 1<<32-1 {
		return fmt.Errorf("want 0 < FIRST <= LAST < 4294967295, at most %d uids", maxUIDs)
	}
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (r UIDRange) MarshalText() ([]byte, error) {
	if r.Count == 0 {
		return nil, nil
	}
	return fmt.Appendf(nil, "%d-%d", r.First, uint64(r.First)+uint64(r.Count)-1), nil
}
