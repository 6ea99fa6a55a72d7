//go:build !windows

package service

import "os"

// unlinkOpenFile removes the name of a file that stays open: its data lives
// until it is closed, and a crash leaves nothing on disk.
func unlinkOpenFile(name string) error { return os.Remove(name) }

// syncDir makes the entries of directory name durable: after a crash it
// lists what was renamed into it before the call.
func syncDir(root *os.Root, name string) error {
	d, err := root.Open(name)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
