package deployments

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
)

// copyBufferSize is large enough that a file costs few write calls.
const copyBufferSize = 256 << 10

// extraction is one plan being written into a fresh directory. Every path it
// touches goes through root, and every file is created with O_EXCL, so no
// path can leave the directory and nothing already there is followed.
type extraction struct {
	root      *os.Root
	plan      *plan
	budget    int64  // most uncompressed bytes allowed, all files together
	overLimit string // which limit the budget is, for the message
	written   atomic.Int64
}

// errStopped ends a worker because another one's failure ends the extraction;
// it is never reported.
var errStopped = errors.New("stopped by another failure")

// extractWorkers write files in parallel: decompression of one file overlaps
// the write and fsync of others, and concurrent fsyncs share journal commits.
const extractWorkers = 4

// inParallel runs work(ctx, i) for every i below count on up to
// extractWorkers goroutines, each made by newWorker (so it can own a buffer),
// and waits for them. The first failure stops the others and is returned.
func inParallel(parent context.Context, count int, newWorker func() func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	var next atomic.Int64
	errs := make([]error, min(extractWorkers, count))
	var wg sync.WaitGroup
	for w := range errs {
		work := newWorker()
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= count || ctx.Err() != nil {
					return
				}
				if err := work(ctx, i); err != nil {
					errs[w] = err
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	if err := parent.Err(); err != nil {
		return err
	}
	// Report the failure that stopped the others, not their cancellation.
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, errStopped) {
			return err
		}
	}
	return nil
}

// run writes directories, then files, then symlinks: links come last so that
// no file is ever written through one. Each file is fsynced when written;
// directories are fsynced once all their entries exist.
func (x *extraction) run(ctx context.Context) error {
	for _, d := range x.plan.dirs {
		if err := x.root.Mkdir(filepath.FromSlash(d), 0o755); err != nil {
			if errors.Is(err, os.ErrExist) {
				// Only a name the filesystem folds onto another gets here.
				return badEntry(d, "collides with another entry on this filesystem")
			}
			return fmt.Errorf("create directory %q: %w", d, err)
		}
		// Mkdir is subject to the umask; the runner must be able to read.
		if err := x.root.Chmod(filepath.FromSlash(d), 0o755); err != nil {
			return fmt.Errorf("set mode of directory %q: %w", d, err)
		}
	}
	files := x.plan.files
	err := inParallel(ctx, len(files), func() func(context.Context, int) error {
		buf := make([]byte, copyBufferSize)
		return func(ctx context.Context, i int) error { return x.writeFile(ctx, files[i], buf) }
	})
	if err != nil {
		return err
	}
	for _, l := range x.plan.links {
		if err := x.root.Symlink(filepath.FromSlash(l.target), filepath.FromSlash(l.name)); err != nil {
			if errors.Is(err, os.ErrExist) {
				return badEntry(l.file.Name, "collides with another entry on this filesystem")
			}
			return fmt.Errorf("create symlink %q: %w", l.name, err)
		}
	}
	dirs := append(x.plan.dirs[:len(x.plan.dirs):len(x.plan.dirs)], ".")
	return inParallel(ctx, len(dirs), func() func(context.Context, int) error {
		return func(_ context.Context, i int) error {
			if err := syncDir(x.root, filepath.FromSlash(dirs[i])); err != nil {
				return fmt.Errorf("sync directory %q: %w", dirs[i], err)
			}
			return nil
		}
	})
}

func (x *extraction) writeFile(ctx context.Context, e *entry, buf []byte) (err error) {
	name := filepath.FromSlash(e.name)
	src, err := e.file.Open()
	if err != nil {
		return &EntryError{Entry: e.file.Name, Reason: err.Error(), Err: ErrBadArchive}
	}
	defer src.Close()
	dst, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, e.mode)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			// Only a name the filesystem folds onto another gets here.
			return badEntry(e.file.Name, "collides with another entry on this filesystem")
		}
		return fmt.Errorf("create %q: %w", e.name, err)
	}
	defer func() {
		if cerr := dst.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close %q: %w", e.name, cerr)
		}
	}()
	if err := x.copy(ctx, e, dst, src, buf); err != nil {
		return err
	}
	// OpenFile's mode is subject to the umask; the runner must be able to read.
	if err := dst.Chmod(e.mode); err != nil {
		return fmt.Errorf("set mode of %q: %w", e.name, err)
	}
	if err := dst.Sync(); err != nil {
		return fmt.Errorf("sync %q: %w", e.name, err)
	}
	return nil
}

// copy counts the bytes it really gets from the decompressor, whatever the
// headers say, and stops as soon as they exceed the budget.
func (x *extraction) copy(ctx context.Context, e *entry, dst io.Writer, src io.Reader, buf []byte) error {
	for {
		n, rerr := fill(src, buf)
		if n > 0 {
			if total := x.written.Add(int64(n)); total > x.budget {
				if total-int64(n) > x.budget {
					return errStopped // another file crossed the budget first and is the one to name
				}
				return &EntryError{Entry: e.file.Name, Reason: "archive unpacks to " + x.overLimit, Err: ErrTooLarge}
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return fmt.Errorf("write %q: %w", e.name, err)
			}
		}
		switch {
		case rerr == io.EOF:
			return nil
		case rerr != nil:
			return &EntryError{Entry: e.file.Name, Reason: "corrupt or does not match its header: " + rerr.Error(), Err: ErrBadArchive}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// fill reads into buf until it is full or src fails, and returns src's error
// unchanged (unlike io.ReadFull, which turns a short read into
// io.ErrUnexpectedEOF, an error the zip reader also uses for corruption).
func fill(src io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := src.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
