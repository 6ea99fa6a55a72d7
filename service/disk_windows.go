package service

import (
	"errors"
	"os"
)

// unlinkOpenFile cannot remove an open file on Windows: the spool removes
// it when it closes it instead.
func unlinkOpenFile(string) error { return errors.ErrUnsupported }

// syncDir does nothing: NTFS makes a rename durable with the file's own
// flush, and Windows cannot flush a directory handle.
func syncDir(*os.Root, string) error { return nil }
