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
