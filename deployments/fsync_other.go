//go:build !windows

package deployments

import "os"

// syncDir makes the entries of directory name durable: after a crash the
// directory lists what was created in it before the call.
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
