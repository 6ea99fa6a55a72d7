package sandbox

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"go.uber.org/goleak"
	"strconv"
)

// testChildEnv makes the test binary act as a function process (Nomad's
// testtask habit): the value names what it does.
const testChildEnv = "FLUX_SANDBOX_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(testChildEnv); mode != "" {
		os.Exit(runTestChild(mode, os.Args[1:]))
	}
	// Executions see a /tmp of their own: the scripts tests write must live
	// elsewhere. Every temp dir of the tests goes under one dir, removed at
	// the end.
	dir, err := testTempRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("TMPDIR", dir)
	if testBinary, err = copyTestBinary(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "leaked goroutines:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// testTempRoot is where tests keep their files: outside /tmp, which
// executions see as their own, when the tests run as root (and so with
// mount namespaces).
func testTempRoot() (string, error) {
	parent := os.TempDir()
	if os.Geteuid() == 0 {
		parent = "/var/lib/flux-agent-tests"
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return "", err
		}
	}
	dir, err := os.MkdirTemp(parent, "sandbox-")
	if err != nil {
		return "", err
	}
	return dir, os.Chmod(dir, 0o755)
}

// testBinary is a copy of this test binary that executions can see (the
// original is under /tmp).
var testBinary string

func copyTestBinary(dir string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "sandbox.test")
	return bin, os.WriteFile(bin, data, 0o755)
}

// testChild is a spec that runs this test binary as the child in mode.
func testChild(t *testing.T, mode string, args ...string) Spec {
	t.Helper()
	return Spec{ID: t.Name(), Path: testBinary, Args: args, Dir: filepath.Dir(testBinary), Env: []string{testChildEnv + "=" + mode}}
}

func ptr(v int64) *int64 { return &v }

func runTestChild(mode string, args []string) int {
	switch mode {
	case "alloc": // alloc MiB: touch that much memory, then report
		mib, _ := strconv.Atoi(args[0])
		mem := make([]byte, mib<<20)
		for i := 0; i < len(mem); i += 4096 {
			mem[i] = 1
		}
		fmt.Println("allocated", mib)
		return 0
	case "alloc-hold": // alloc-hold MiB: touch that much memory, report, keep it
		mib, _ := strconv.Atoi(args[0])
		mem := make([]byte, mib<<20)
		for i := 0; i < len(mem); i += 4096 {
			mem[i] = 1
		}
		heldMemory = mem // reachable from a global: the GC must not return it
		fmt.Println("allocated", mib)
		select {} // until killed
	case "alloc-spin": // alloc-spin MiB: touch that much memory, report it and the uid, then burn CPU until killed
		mib, _ := strconv.Atoi(args[0])
		mem := make([]byte, mib<<20)
		for i := 0; i < len(mem); i += 4096 {
			mem[i] = 1
		}
		heldMemory = mem
		fmt.Println("allocated", mib, "uid", os.Getuid())
		for {
		}
	case "env": // print the environment sorted, then check TMPDIR is usable
		env := os.Environ()
		slices.Sort(env)
		for _, kv := range env {
			fmt.Println(kv)
		}
		if err := os.WriteFile(filepath.Join(os.Getenv("TMPDIR"), "probe"), []byte("x"), 0o600); err != nil {
			fmt.Println(err)
			return 1
		}
		fmt.Println("scratch writable")
		return 0
	case "abstract": // abstract NAME: connect to the node's socket, then to one of its own
		if _, err := net.Dial("unix", args[0]); err != nil {
			fmt.Println("node: refused:", err)
		} else {
			fmt.Println("node: connected")
		}
		own := args[0] + "-own"
		l, err := net.Listen("unix", own)
		if err != nil {
			fmt.Println("own listen:", err)
			return 1
		}
		defer l.Close()
		go func() {
			if c, err := l.Accept(); err == nil {
				c.Close()
			}
		}()
		if c, err := net.Dial("unix", own); err != nil {
			fmt.Println("own:", err)
		} else {
			c.Close()
			fmt.Println("own: ok")
		}
		return 0
	default:
		fmt.Fprintln(os.Stderr, "unknown test child mode", mode)
		return 2
	}
}

// heldMemory keeps alloc-hold's allocation alive while the child waits to
// be killed (a local would be dead after its last use, and freed).
var heldMemory []byte
