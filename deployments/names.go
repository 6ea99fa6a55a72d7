package deployments

import (
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"strings"
)

var (
	// ErrInvalidName is wrapped by every refusal of a function name, so one
	// check can guard every RPC that takes one.
	ErrInvalidName = errors.New("invalid function name")
	// ErrInvalidHandler is wrapped when a handler cannot be a path inside the
	// function's code.
	ErrInvalidHandler = errors.New("invalid handler")
)

// maxNameLen is the longest function name: one character plus 62 more.
const maxNameLen = 63

// ValidName reports why name cannot name a function, or nil. A valid name
// matches [A-Za-z0-9][A-Za-z0-9._-]{0,62}, so it is always a single path
// element that is neither "." nor "..", on every platform.
func ValidName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("%w: %d characters, at most %d allowed", ErrInvalidName, len(name), maxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case isAlnum(c):
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		case i == 0:
			return fmt.Errorf("%w: %q must start with a letter or digit", ErrInvalidName, name)
		default:
			return fmt.Errorf("%w: %q contains %q at offset %d; only letters, digits, '.', '_' and '-' are allowed", ErrInvalidName, name, c, i)
		}
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// ValidHandler reports why handler cannot be the path of a function's entry
// point, or nil. It is the static half of the check: at execution time
// Lease.Handler checks again against the files, resolving symlinks. Paths use
// '/' on every platform, as they do inside a zip.
func ValidHandler(handler string) error {
	switch {
	case handler == "":
		return fmt.Errorf("%w: empty", ErrInvalidHandler)
	case strings.ContainsRune(handler, 0):
		return fmt.Errorf("%w: %q contains a NUL byte", ErrInvalidHandler, handler)
	case strings.ContainsRune(handler, '\\'):
		return fmt.Errorf("%w: %q contains a backslash; use '/'", ErrInvalidHandler, handler)
	case strings.HasPrefix(handler, "/") || filepath.IsAbs(handler) || filepath.VolumeName(handler) != "":
		return fmt.Errorf("%w: %q is absolute; it must be relative to the function's code", ErrInvalidHandler, handler)
	case hasDotDot(handler):
		return fmt.Errorf("%w: %q contains a \"..\" element", ErrInvalidHandler, handler)
	case path.Clean(handler) != handler || handler == ".":
		return fmt.Errorf("%w: %q is not a clean path (want %q)", ErrInvalidHandler, handler, path.Clean(handler))
	case !filepath.IsLocal(filepath.FromSlash(handler)):
		return fmt.Errorf("%w: %q is not a local path on this system", ErrInvalidHandler, handler)
	}
	return nil
}

// hasDotDot reports whether any '/'-separated element of p is "..".
func hasDotDot(p string) bool {
	for elem := range strings.SplitSeq(p, "/") {
		if elem == ".." {
			return true
		}
	}
	return false
}
