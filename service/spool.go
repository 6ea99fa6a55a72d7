package service

import (
	"errors"
	"fmt"
	"os"
)

// spool is an execution's output kept on local disk from its first byte, as
// it goes to Redis: when Redis loses the output (it restarted without its
// data, or a replica took over without the last writes), the agent writes
// it again from here instead of leaving a gap that SETRANGE would fill with
// NUL bytes. On disk rather than in memory, because an output may be as
// large as the output limit and every running execution may have one.
// The file has no name once made (Unix), so nothing is left behind
// whatever happens to the agent.
type spool struct {
	f *os.File
	// name is the file's path while it must still be removed (Windows
	// cannot remove an open file); "" once unlinked.
	name string
}

// errNoCopy says the agent has no copy of output Redis lost.
var errNoCopy = errors.New("no local copy of the output")

// openSpool makes an empty spool in dir ("" = the system's temp dir).
func openSpool(dir string) (*spool, error) {
	f, err := os.CreateTemp(dir, "flux-output-*")
	if err != nil {
		return nil, fmt.Errorf("output spool: %w", err)
	}
	sp := &spool{f: f, name: f.Name()}
	if unlinkOpenFile(sp.name) == nil {
		sp.name = ""
	}
	return sp, nil
}

// writeAt stores p at off.
func (sp *spool) writeAt(p []byte, off int64) error {
	if _, err := sp.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("output spool: %w", err)
	}
	return nil
}

// readAt fills p from off; the bytes must have been written.
func (sp *spool) readAt(p []byte, off int64) error {
	if _, err := sp.f.ReadAt(p, off); err != nil {
		return fmt.Errorf("output spool: %w", err)
	}
	return nil
}

// close frees the file and its disk space.
func (sp *spool) close() error {
	err := sp.f.Close()
	if sp.name != "" {
		err = errors.Join(err, os.Remove(sp.name))
	}
	return err
}
