package deployments

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// Lease pins one version of a function's code for one execution: it is not
// removed while the lease is held, whatever is deployed meanwhile.
type Lease struct {
	// Dir is the version's absolute directory, the execution's working dir.
	Dir string
	// Version names the pinned version.
	Version string

	store    *Store
	function string
	once     sync.Once
}

// Acquire pins the current version of function name.
func (s *Store) Acquire(name string) (*Lease, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	fn := s.functions[name]
	if fn == nil || fn.current == nil || fn.versions[fn.current.Version] == nil {
		return nil, fmt.Errorf("%w: %q", ErrNotDeployed, name)
	}
	fn.versions[fn.current.Version].leases++
	return &Lease{
		Dir:      filepath.Join(s.dir, name, fn.current.Version),
		Version:  fn.current.Version,
		store:    s,
		function: name,
	}, nil
}

// Handler returns the absolute path of handler inside the leased version,
// with symlinks resolved. It is the execution-time half of the handler check:
// the file must exist, be a regular file, and stay inside l.Dir.
func (l *Lease) Handler(handler string) (string, error) {
	if err := ValidHandler(handler); err != nil {
		return "", err
	}
	realDir, err := filepath.EvalSymlinks(l.Dir)
	if err != nil {
		return "", fmt.Errorf("version dir: %w", err)
	}
	resolved, err := filepath.EvalSymlinks(filepath.Join(realDir, filepath.FromSlash(handler)))
	if err != nil {
		return "", fmt.Errorf("%w: %q: %w", ErrHandlerMissing, handler, err)
	}
	rel, err := filepath.Rel(realDir, resolved)
	if err != nil || !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%w: %q resolves to %q", ErrHandlerOutside, handler, resolved)
	}
	fi, err := os.Stat(resolved)
	if err != nil {
		return "", fmt.Errorf("%w: %q: %w", ErrHandlerMissing, handler, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%w: %q is a %v", ErrHandlerMissing, handler, fi.Mode().Type())
	}
	return filepath.Join(l.Dir, rel), nil
}

// Release ends the lease; the version may then be removed. Calling it again
// does nothing.
func (l *Lease) Release() {
	l.once.Do(func() {
		s := l.store
		s.mu.Lock()
		fn := s.functions[l.function]
		v := fn.versions[l.Version]
		v.leases--
		stale := v.leases == 0 && (fn.current == nil || fn.current.Version != l.Version) && !s.closed
		if stale {
			s.inflight.Add(1) // keeps s.root open until the removal is done
		}
		s.mu.Unlock()
		if stale {
			// Removing a big old version must not hold up the execution
			// that released it; Close waits for it (inflight).
			go func() {
				defer s.inflight.Done()
				s.collect(l.function, fn)
			}()
		}
	})
}
