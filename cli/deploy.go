package cli

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// deployTimeout is Flux's own deadline for a deploy, doubled for a slow
// link.
const deployTimeout = 60 * time.Second

// progressFrom is the size from which zipping shows a progress bar on a
// terminal.
const progressFrom = 4 << 20

// runDeploy zips DIR and deploys it with its config, which registers the
// function in the same step.
func runDeploy(ctx context.Context, inv *invocation) error {
	dir, err := inv.arg("DIR")
	if err != nil {
		return err
	}
	if inv.name == "" || inv.handler == "" {
		return usageError("--name and --handler are required")
	}
	if inv.behavior != "exit" && inv.behavior != "wait" {
		return usageError("--behavior is exit or wait, not %q", inv.behavior)
	}
	if err := checkHandler(dir, inv.handler, inv.env.Stderr); err != nil {
		return err
	}
	var bar *progress
	if !inv.json && isTerminal(inv.env.Stderr) {
		bar = &progress{w: inv.env.Stderr, label: "zipping " + dir}
	}
	archive, files, err := zipDir(dir, bar)
	if err != nil {
		return err
	}
	if len(archive) > maxMessageBytes-(1<<20) {
		return fmt.Errorf("%s zips to %s, more than the %s a deploy may carry: leave out what the function does not need", dir, formatBytes(int64(len(archive))), formatBytes(maxMessageBytes-(1<<20)))
	}
	c, err := inv.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if bar != nil && len(archive) >= progressFrom {
		fmt.Fprintf(inv.env.Stderr, "sending %s to the agent…\n", formatBytes(int64(len(archive))))
	}
	callCtx, cancel := context.WithTimeout(ctx, deployTimeout)
	defer cancel()
	ack, err := c.agent.DeployFunction(callCtx, &fluxpb.DeploymentPackage{
		FunctionName: inv.name,
		CodeArchive:  archive,
		Config: &fluxpb.FunctionConfig{
			Name:                   inv.name,
			Handler:                inv.handler,
			CpuMillicores:          int32(inv.cpu),
			MemoryMb:               inv.memory,
			TimeoutSeconds:         int32(inv.timeout),
			Env:                    inv.fnEnv,
			MaxConcurrency:         int32(inv.concurrency),
			MaxConcurrencyBehavior: inv.behavior,
		},
	})
	if err != nil {
		return c.explain(err)
	}
	if inv.json {
		return writeJSON(inv.env.Stdout, map[string]any{
			"function": inv.name, "success": ack.GetSuccess(), "message": ack.GetMessage(),
			"archive_bytes": len(archive), "files": files,
		})
	}
	if !ack.GetSuccess() {
		return errors.New(ack.GetMessage())
	}
	fmt.Fprintln(inv.env.Stdout, ack.GetMessage())
	return nil
}

// checkHandler refuses a handler DIR does not hold and warns of one that
// is not executable: the agent runs it directly, as argv[0].
func checkHandler(dir, handler string, warn io.Writer) error {
	st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(handler)))
	if err != nil {
		return fmt.Errorf("--handler %s: %w (it is relative to %s)", handler, err, dir)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("--handler %s is not a file", handler)
	}
	if st.Mode().Perm()&0o111 == 0 {
		fmt.Fprintf(warn, "warning: %s is not executable, so it will not start: chmod +x %s (and start it with a #! line)\n",
			handler, filepath.Join(dir, handler))
	}
	return nil
}

// zipDir zips the files, directories and symlinks under dir, names
// relative to it, keeping the executable bit; it returns the archive and
// how many files it holds.
func zipDir(dir string, bar *progress) ([]byte, int, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, 0, err
	}
	if !st.IsDir() {
		return nil, 0, fmt.Errorf("%s is not a directory", dir)
	}
	var total int64
	if bar != nil {
		filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if info, err := d.Info(); err == nil {
					total += info.Size()
				}
			}
			return nil
		})
		if total < progressFrom {
			bar = nil
		} else {
			bar.total = total
		}
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	files := 0
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil || rel == "." {
			return err
		}
		name := filepath.ToSlash(rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		h, err := zip.FileInfoHeader(info)
		if err != nil {
			return err
		}
		h.Name = name
		switch {
		case d.IsDir():
			h.Name += "/"
			_, err = zw.CreateHeader(h)
			return err
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			w, err := zw.CreateHeader(h)
			if err != nil {
				return err
			}
			_, err = io.WriteString(w, filepath.ToSlash(target))
			return err
		case !d.Type().IsRegular():
			return fmt.Errorf("%s is a %s; a function's code holds files, directories and symlinks only", path, strings.ToLower(info.Mode().Type().String()))
		}
		h.Method = zip.Deflate
		w, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		var src io.Reader = f
		if bar != nil {
			src = io.TeeReader(f, bar)
		}
		if _, err := io.Copy(w, src); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		files++
		return nil
	})
	if err == nil {
		err = zw.Close()
	}
	bar.finish()
	if err != nil {
		return nil, 0, fmt.Errorf("zip %s: %w", dir, err)
	}
	return buf.Bytes(), files, nil
}

// progress draws a bar on a terminal as bytes go through it.
type progress struct {
	w     io.Writer
	label string
	total int64
	done  int64
	drawn time.Time
}

func (p *progress) Write(b []byte) (int, error) {
	p.done += int64(len(b))
	if now := time.Now(); now.Sub(p.drawn) > 100*time.Millisecond {
		p.drawn = now
		p.draw()
	}
	return len(b), nil
}

func (p *progress) draw() {
	const width = 30
	frac := float64(p.done) / float64(max(p.total, 1))
	frac = min(frac, 1)
	filled := int(frac * width)
	fmt.Fprintf(p.w, "\r%s [%s%s] %3.0f%% %s/%s", p.label, strings.Repeat("#", filled), strings.Repeat(" ", width-filled),
		frac*100, formatBytes(p.done), formatBytes(p.total))
}

func (p *progress) finish() {
	if p == nil || p.total == 0 {
		return
	}
	p.draw()
	fmt.Fprintln(p.w)
}
