package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Port accepts a quoted string ("50052", as Flux writes it) or a number.
type Port uint16

// UnmarshalText implements encoding.TextUnmarshaler.
func (p *Port) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	if s == "" {
		return errors.New("empty; want a port number")
	}
	v, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return fmt.Errorf("%q is not a port number (0-65535)", text)
	}
	*p = Port(v)
	return nil
}

// ByteSize is a size in bytes written as a number or with a unit
// (KiB, MiB, GiB; KB, MB, GB).
type ByteSize int64

// byteUnits are the suffixes a size may have; String writes the binary
// ones, the first three.
var byteUnits = []struct {
	suffix string
	factor int64
}{
	{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *ByteSize) UnmarshalText(text []byte) error {
	num, factor := strings.TrimSpace(string(text)), int64(1)
	if num == "" {
		return errors.New("empty; want a size")
	}
	for _, u := range byteUnits {
		if strings.HasSuffix(num, u.suffix) {
			num, factor = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.factor
			break
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/factor {
		return fmt.Errorf("%q is not a size (e.g. 16MiB or 1048576)", text)
	}
	*b = ByteSize(v * factor)
	return nil
}

// MarshalText implements encoding.TextMarshaler: sizes print as they are
// best written.
func (b ByteSize) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// String shows the size the way it is best written.
func (b ByteSize) String() string {
	for _, u := range byteUnits[:3] {
		if int64(b) >= u.factor && int64(b)%u.factor == 0 {
			return fmt.Sprintf("%d%s", int64(b)/u.factor, u.suffix)
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// TaskLimit is max_tasks: how many executions may run at once on the node,
// 0 for no limit, or TaskLimitAuto.
type TaskLimit int

// TaskLimitAuto (written "auto") allows TasksPerCPU executions per CPU.
const TaskLimitAuto TaskLimit = -1

// TasksPerCPU is what max_tasks: auto allows per CPU. Most functions wait
// on the network far more than they compute, so several share a CPU well;
// the bound is what each running execution costs the agent (pipes, output
// buffers, a cgroup) and the node (processes, memory), so that a burst is
// refused with "at capacity" before the node is swamped.
const TasksPerCPU = 32

// Resolve is the number of executions allowed on a node with cpus CPUs;
// 0 means no limit.
func (t TaskLimit) Resolve(cpus int) int {
	if t == TaskLimitAuto {
		return TasksPerCPU * max(cpus, 1)
	}
	return int(t)
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (t *TaskLimit) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	if s == "auto" {
		*t = TaskLimitAuto
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return fmt.Errorf("%q: want auto (%d per CPU), 0 (unlimited) or a positive number", text, TasksPerCPU)
	}
	*t = TaskLimit(n)
	return nil
}

// MarshalYAML implements yaml.Marshaler: auto, or the number unquoted.
func (t TaskLimit) MarshalYAML() (any, error) {
	if t == TaskLimitAuto {
		return "auto", nil
	}
	return int(t), nil
}
