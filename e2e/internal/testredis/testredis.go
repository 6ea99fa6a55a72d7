// Package testredis runs real redis-server processes for the end-to-end
// tests (the agent's and the package's): on a free loopback port, without
// persistence unless a test asks, stopped at the end of the test. A test
// may also stall, kill and restart one: the faults the agent must survive.
package testredis

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is one redis-server. Client is a plain client of it that never
// retries, for the test's own reads and writes.
type Server struct {
	Addr   string
	Client *redis.Client

	t      testing.TB
	port   int
	dir    string
	args   []string
	cmd    *exec.Cmd
	exited chan struct{}
	logs   *logBuffer
}

// Start runs redis-server with args added to the defaults and waits until
// it answers. It fails the test when redis-server is not installed.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server is needed for e2e tests (apt-get install redis-server): %v", err)
	}
	for attempt := 0; ; attempt++ {
		s := &Server{t: t, port: FreePort(t), dir: t.TempDir(), args: args}
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
		s.Client = redis.NewClient(&redis.Options{Addr: s.Addr, MaxRetries: -1})
		if s.run() {
			t.Cleanup(func() {
				s.Client.Close()
				s.Kill()
			})
			return s
		}
		s.Client.Close()
		if attempt == 3 { // the port was taken between FreePort and bind
			t.Fatalf("redis-server exited: %s", s.logs.String())
		}
	}
}

// run starts the server (with the data in its dir, if any was saved) and
// waits until it answers; false if it exited instead.
func (s *Server) run() bool {
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir}, s.args...)
	cmd := exec.Command("redis-server", args...)
	s.logs = &logBuffer{}
	cmd.Stdout, cmd.Stderr = s.logs, s.logs
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.cmd, s.exited = cmd, exited
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			return false
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := s.Client.Ping(ctx).Err()
		cancel()
		if err == nil {
			return true
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server did not answer: %v\n%s", err, s.logs.String())
		}
		time.Sleep(10 * time.Millisecond) // polling interval, not synchronisation
	}
}

// Signal sends sig to the server (SIGSTOP stalls it, SIGCONT resumes it).
func (s *Server) Signal(sig os.Signal) {
	s.t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}

// Kill ends the server at once, stalled or not; its port is closed then.
// It is a no-op on a server already killed.
func (s *Server) Kill() {
	s.cmd.Process.Kill() // SIGKILL ends a stopped process too
	<-s.exited
}

// Restart starts the killed server again on its port: empty, or with what
// SAVE wrote to its dir.
func (s *Server) Restart() {
	s.t.Helper()
	if !s.run() {
		s.t.Fatalf("redis-server did not restart: %s", s.logs.String())
	}
}

// Logs is what the server has written so far.
func (s *Server) Logs() string { return s.logs.String() }

// FreePort returns a loopback TCP port free at the time of the call.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// logBuffer collects a server's output while the test reads it.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
