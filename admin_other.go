//go:build !windows

package main

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/serverless-fabric/flux-agent/doctor"
)

// adminEndpoint is the admin socket: a Unix socket of mode 0600, owned by
// the agent's user (root), in a directory others cannot write. Nothing
// else guards it: functions run as other uids, so the mode refuses them.
type adminEndpoint struct {
	net.Listener
	path string
	made os.FileInfo // the socket file this agent made, removed at close
}

// listenAdmin binds the admin socket. A socket left by an agent that died
// is replaced; one another agent serves is an error. The socket is bound
// under a temporary name and renamed once its mode is 0600, so it is never
// reachable with a wider mode.
func listenAdmin(cfg AdminConfig) (*adminEndpoint, error) {
	path := cfg.Socket
	if path == "" {
		return nil, nil
	}
	dir := filepath.Dir(path)
	if err := adminDir(dir); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("admin.socket %s exists and is not a socket: remove it or choose another path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin.socket %s is served by another running agent: stop it, or give this agent its own admin.socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin.socket: removing the stale %s: %w", path, err)
		}
	}
	tmp := filepath.Join(dir, "."+filepath.Base(path)+"."+strconv.Itoa(os.Getpid()))
	_ = os.Remove(tmp)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("admin.socket: %w", err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		l.Close()
		_ = os.Remove(tmp)
		return nil, fmt.Errorf("admin.socket %s: %w", path, err)
	}
	made, err := os.Lstat(path)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("admin.socket %s: %w", path, err)
	}
	return &adminEndpoint{Listener: l, path: path, made: made}, nil
}

// adminDir makes the socket's directory 0700 when it does not exist (under
// systemd it comes from RuntimeDirectory=flux-agent); an existing one must
// be the agent's user's and writable by nobody else, or another user could
// put its own socket in its place.
func adminDir(dir string) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("admin.socket: %w (under systemd the unit's RuntimeDirectory=flux-agent makes /run/flux-agent)", err)
		}
		return os.Chmod(dir, 0o700)
	}
	if err != nil {
		return fmt.Errorf("admin.socket: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("admin.socket: %s is not a directory", dir)
	case ok && int(st.Uid) != os.Geteuid() && st.Uid != 0:
		return fmt.Errorf("admin.socket: %s belongs to uid %d, not to the agent's user: use a directory of the agent's own (default /run/flux-agent)", dir, st.Uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("admin.socket: %s is writable by others (%s): another user could replace the socket; use a directory only the agent's user may write (default /run/flux-agent)", dir, fi.Mode().Perm())
	}
	return nil
}

// Where names the endpoint in logs and status.
func (e *adminEndpoint) Where() string { return e.path }

// ServerOptions are what the admin server needs beside the agent's:
// nothing, the socket's mode is the guard.
func (e *adminEndpoint) ServerOptions() []grpc.ServerOption { return nil }

// Close stops listening and removes the socket, if it is still the one
// this agent made.
func (e *adminEndpoint) Close() error {
	err := e.Listener.Close()
	if errors.Is(err, net.ErrClosed) { // the gRPC server closed it
		err = nil
	}
	if cur, serr := os.Lstat(e.path); serr == nil && os.SameFile(cur, e.made) {
		err = errors.Join(err, os.Remove(e.path))
	}
	return err
}

// adminListener is the admin endpoint as doctor checks it.
func adminListener(cfg AdminConfig) doctor.Listener {
	return doctor.Listener{Key: "admin.socket", Network: "unix", Address: cfg.Socket}
}
