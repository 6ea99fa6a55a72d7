package cli

import (
	"archive/zip"
	"bytes"
	"context"
	"flag"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestParseInterleaved(t *testing.T) {
	for _, tc := range []struct {
		args              []string
		wantPos, wantPass []string
		wantName          string
		wantAsync         bool
	}{
		{[]string{"dir", "--name", "n"}, []string{"dir"}, nil, "n", false},
		{[]string{"--name", "n", "dir", "--async"}, []string{"dir"}, nil, "n", true},
		{[]string{"fn", "--async", "--", "--name", "x", "--"}, []string{"fn"}, []string{"--name", "x", "--"}, "", true},
		{[]string{"--", "a"}, nil, []string{"a"}, "", false},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		name := fs.String("name", "", "")
		async := fs.Bool("async", false, "")
		pos, pass, err := parseInterleaved(fs, tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if diff := cmp.Diff(tc.wantPos, pos); diff != "" {
			t.Errorf("%v: positional (-want +got):\n%s", tc.args, diff)
		}
		if diff := cmp.Diff(tc.wantPass, pass); diff != "" {
			t.Errorf("%v: passthrough (-want +got):\n%s", tc.args, diff)
		}
		if *name != tc.wantName || *async != tc.wantAsync {
			t.Errorf("%v: name %q async %v", tc.args, *name, *async)
		}
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1 KiB", 1536: "1.5 KiB", 128 << 20: "128 MiB", 700 << 10: "700 KiB", 3<<30 + 1<<29: "3.5 GiB"} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
	for d, want := range map[time.Duration]string{850 * time.Millisecond: "850ms", 3240 * time.Millisecond: "3.2s", 252 * time.Second: "4m12s", 2*time.Hour + 5*time.Minute: "2h5m"} {
		if got := formatDuration(d); got != want {
			t.Errorf("formatDuration(%s) = %q, want %q", d, got, want)
		}
	}
}

func TestExecutionID(t *testing.T) {
	shape := regexp.MustCompile(`^exc-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	a, b := newExecutionID(), newExecutionID()
	if !shape.MatchString(a) || a == b {
		t.Errorf("ids %q %q", a, b)
	}
}

func TestRecordExitCode(t *testing.T) {
	three := 3
	for _, tc := range []struct {
		rec  record
		want int
	}{
		{record{Status: "success"}, 0},
		{record{Status: "failed", ExitCode: &three}, 3},
		{record{Status: "failed", Error: "start: no such file"}, exitNotRun},
		{record{Status: "cancelled"}, exitInterrupted},
	} {
		if got := tc.rec.exitCode(); got != tc.want {
			t.Errorf("%+v: exit %d, want %d", tc.rec, got, tc.want)
		}
	}
}

func TestZipDir(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "lib"), 0o755)
	os.WriteFile(filepath.Join(dir, "handler.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	os.WriteFile(filepath.Join(dir, "lib", "data.txt"), []byte("data"), 0o644)
	if runtime.GOOS != "windows" {
		os.Symlink("lib/data.txt", filepath.Join(dir, "link"))
	}
	archive, files, err := zipDir(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := zip.NewReader(bytes.NewReader(archive), int64(len(archive)))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, f := range zr.File {
		kind := "file"
		switch {
		case f.Mode().IsDir():
			kind = "dir"
		case f.Mode()&os.ModeSymlink != 0:
			r, _ := f.Open()
			target, _ := io.ReadAll(r)
			kind = "link to " + string(target)
		case f.Mode().Perm()&0o100 != 0:
			kind = "executable"
		}
		got[f.Name] = kind
	}
	want := map[string]string{"handler.sh": "executable", "lib/": "dir", "lib/data.txt": "file"}
	if runtime.GOOS != "windows" {
		want["link"] = "link to lib/data.txt"
	}
	if diff := cmp.Diff(want, got); diff != "" || files != 2 {
		t.Errorf("archive (-want +got):\n%s files %d", diff, files)
	}
}

func TestDeployChecksTheHandler(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "run.sh"), []byte("echo\n"), 0o644)
	var warn bytes.Buffer
	if err := checkHandler(dir, "missing.sh", &warn); err == nil || !strings.Contains(err.Error(), "relative to") {
		t.Errorf("missing handler: %v", err)
	}
	if err := checkHandler(dir, "run.sh", &warn); err != nil || (runtime.GOOS != "windows" && !strings.Contains(warn.String(), "chmod +x")) {
		t.Errorf("not executable: %v, %q", err, warn.String())
	}
}

func TestUsageErrorsAndSocketErrors(t *testing.T) {
	var out, errOut bytes.Buffer
	env := Env{Stdout: &out, Stderr: &errOut, AdminSocket: filepath.Join(t.TempDir(), "none.sock")}
	if code := Run(context.Background(), env, []string{"deploy", "dir"}); code != 2 || !strings.Contains(errOut.String(), "--name and --handler are required") {
		t.Errorf("deploy without flags: %d %q", code, errOut.String())
	}
	errOut.Reset()
	if code := Run(context.Background(), env, []string{"ps"}); code != 1 || !strings.Contains(errOut.String(), "is the agent running?") {
		t.Errorf("ps without an agent: %d %q", code, errOut.String())
	}
	errOut.Reset()
	if code := Run(context.Background(), env, []string{"invoke", "fn"}); code != exitNotRun {
		t.Errorf("invoke without an agent: %d %q", code, errOut.String())
	}
	errOut.Reset()
	if code := Run(context.Background(), env, []string{"ps", "--addr", "127.0.0.1:1"}); code != 1 || !strings.Contains(errOut.String(), "needs the agent's admin socket") {
		t.Errorf("ps over --addr: %d %q", code, errOut.String())
	}
	if !IsCommand("doctor") || IsCommand("check-config") {
		t.Error("IsCommand")
	}
}
