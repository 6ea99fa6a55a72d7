package service

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"sync"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/serverless-fabric/flux-agent/deployments"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// functionFile names the copy of a function's config in the function's
// directory of apps_dir, next to its code.
const functionFile = "function.json"

// functionTemp is the copy being written; a name starting with '.' is one
// the code store removes at start, so a crash mid-write leaves nothing.
const functionTemp = ".function.json.new"

// FunctionFiles names the files the service keeps in each function's dir
// of apps_dir, for the code store to leave alone.
var FunctionFiles = []string{functionFile}

// localFunctions keeps a copy of every registered function's config on
// local disk, in apps_dir/<name>/function.json, so that the agent runs its
// functions without Flux registering them again when Redis lost them (it
// restarted empty), across the agent's own restarts too, and writes them
// back to Redis. Copies are written atomically (a temp file, fsynced, then
// renamed) and readable by the agent's user only: env holds secrets, and
// functions can read apps_dir. A nil *localFunctions keeps no copies.
type localFunctions struct {
	mu   sync.Mutex // one write at a time: they share their temp names
	root *os.Root   // nil once closed
}

// errCopiesClosed refuses a copy once the agent is shutting down.
var errCopiesClosed = errors.New("the agent is shutting down")

// openLocalFunctions keeps copies in dir (apps_dir); "" keeps none.
func openLocalFunctions(dir string) (*localFunctions, error) {
	if dir == "" {
		return nil, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("function copies: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("function copies: %w", err)
	}
	return &localFunctions{root: root}, nil
}

// save writes fn's copy, replacing the previous one at once.
func (l *localFunctions) save(fn *fluxpb.FunctionConfig) error {
	if l == nil {
		return nil
	}
	name := fn.GetName()
	data, err := protojson.Marshal(fn)
	if err != nil {
		return fmt.Errorf("encode function %s: %w", name, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.root == nil {
		return fmt.Errorf("local copy of function %s: %w", name, errCopiesClosed)
	}
	if err := l.write(name, data); err != nil {
		return fmt.Errorf("local copy of function %s: %w", name, err)
	}
	return nil
}

func (l *localFunctions) write(name string, data []byte) error {
	switch err := l.root.Mkdir(name, 0o755); {
	case err == nil:
		// The code store makes the same directory for the code; functions
		// must reach that, not this file.
		if err := l.root.Chmod(name, 0o755); err != nil {
			return err
		}
	case !errors.Is(err, fs.ErrExist):
		return err
	}
	tmp := path.Join(name, functionTemp)
	f, err := l.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o600) // a temp file left by a crash may have had another mode
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = l.root.Rename(tmp, path.Join(name, functionFile))
	}
	if err == nil {
		err = syncDir(l.root, name)
	}
	if err != nil {
		l.root.Remove(tmp)
	}
	return err
}

// remove deletes fn's copy, so that a copy that could not be updated does
// not bring an old config back at the next start.
func (l *localFunctions) remove(name string) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.root == nil {
		return fmt.Errorf("local copy of function %s: %w", name, errCopiesClosed)
	}
	if err := l.root.Remove(path.Join(name, functionFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("local copy of function %s: %w", name, err)
	}
	return nil
}

// load reads every copy. A copy that cannot be read or is not valid is
// skipped and reported in errs; the others still load.
func (l *localFunctions) load() (fns []*fluxpb.FunctionConfig, errs []error) {
	if l == nil {
		return nil, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	entries, err := fs.ReadDir(l.root.FS(), ".")
	if err != nil {
		return nil, []error{fmt.Errorf("function copies: %w", err)}
	}
	for _, de := range entries {
		name := de.Name()
		if !de.IsDir() || deployments.ValidName(name) != nil {
			continue
		}
		data, err := l.root.ReadFile(path.Join(name, functionFile))
		if errors.Is(err, fs.ErrNotExist) {
			continue // code without a copy: registered before copies were kept
		}
		fn := &fluxpb.FunctionConfig{}
		if err == nil {
			err = protojson.Unmarshal(data, fn)
		}
		if err == nil && fn.GetName() != name {
			err = fmt.Errorf("it names function %q", fn.GetName())
		}
		if err == nil {
			err = validateFunction(fn)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("local copy of function %s: %w", name, err))
			continue
		}
		fns = append(fns, fn)
	}
	return fns, errs
}

// close releases apps_dir; later copies fail.
func (l *localFunctions) close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.root == nil {
		return nil
	}
	err := l.root.Close()
	l.root = nil
	return err
}
