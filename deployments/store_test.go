package deployments

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// versionsOnDisk lists the version directories of function name.
func versionsOnDisk(t *testing.T, apps, name string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(apps, name))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		if e.Name() != currentFile {
			got = append(got, e.Name())
		}
	}
	sort.Strings(got)
	return got
}

// settledVersionsOnDisk waits (with a deadline) until the versions on disk
// satisfy ok: old versions are removed in the background after a release.
func settledVersionsOnDisk(t *testing.T, apps, name string, ok func([]string) bool) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := versionsOnDisk(t, apps, name)
		if ok(got) || time.Now().After(deadline) {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestDeployInstallsFilesWithModes(t *testing.T) {
	env := newTestEnv(t, Options{})
	archive := zipOf(t,
		file("main.sh", "#!/bin/sh\necho hi\n"), // handler without exec bits: made executable
		member{Name: "bin/suid", Body: "s", Mode: 0o4777 | fs.ModeSetuid},
		member{Name: "bin/private", Body: "p", Mode: 0o600},
		member{Name: "bin/group-exec", Body: "g", Mode: 0o710},
		member{Name: "sticky/", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
		file("sticky/data", "d"),
		symlink("bin/run", "../main.sh"),
	)
	d := env.deploy(t, "fn", "main.sh", archive)
	if wantBytes := int64(len("#!/bin/sh\necho hi\n") + 4); d.Unchanged || d.Files != 5 || d.Bytes != wantBytes {
		t.Errorf("Deploy = %+v, want 5 files, %d bytes, changed", d, wantBytes)
	}
	lease, err := env.store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	if want := filepath.Join(env.apps, "fn", d.Version); lease.Dir != want || lease.Version != d.Version {
		t.Errorf("lease = %s %s, want %s %s", lease.Dir, lease.Version, want, d.Version)
	}
	want := map[string]string{
		".":              "dir drwxr-xr-x",
		"main.sh":        "file -rwxr-xr-x",
		"bin":            "dir drwxr-xr-x",
		"bin/suid":       "file -rwxr-xr-x",
		"bin/private":    "file -rw-r--r--",
		"bin/group-exec": "file -rwxr-xr-x",
		"bin/run":        "symlink -> ../main.sh",
		"sticky":         "dir drwxr-xr-x",
		"sticky/data":    "file -rw-r--r--",
	}
	got := snapshot(t, lease.Dir)
	for k, v := range got {
		if strings.HasPrefix(v, "file ") {
			got[k] = v[:strings.LastIndexByte(v, ' ')] // drop the digest
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("installed files (-want +got):\n%s", diff)
	}
	content, err := os.ReadFile(filepath.Join(lease.Dir, "bin", "run"))
	if err != nil || string(content) != "#!/bin/sh\necho hi\n" {
		t.Errorf("reading through bin/run: %q, %v", content, err)
	}
}

func TestDeployIsIdempotent(t *testing.T) {
	env := newTestEnv(t, Options{})
	archive := goodArchive(t)
	first := env.deploy(t, "fn", "main.sh", archive)
	again := env.deploy(t, "fn", "main.sh", archive)
	want := first
	want.Unchanged = true
	if diff := cmp.Diff(want, again); diff != "" {
		t.Errorf("re-deploy of the same archive (-want +got):\n%s", diff)
	}
	if got := versionsOnDisk(t, env.apps, "fn"); !cmp.Equal(got, []string{first.Version}) {
		t.Errorf("versions on disk = %v, want only %s", got, first.Version)
	}

	// The same archive under another handler installs different modes.
	other := env.deploy(t, "fn", "lib/helper", archive)
	if other.Unchanged || other.Version == first.Version {
		t.Errorf("deploy with another handler = %+v, want a new version", other)
	}

	// Flux re-sends every function after an agent restarts.
	if err := env.store.Close(); err != nil {
		t.Fatal(err)
	}
	store, err := Open(env.apps, Options{})
	if err != nil {
		t.Fatal(err)
	}
	env.store = store
	again, err = store.Deploy(context.Background(), "fn", "lib/helper", archive)
	if err != nil || !again.Unchanged || again.Version != other.Version {
		t.Errorf("re-deploy after reopening = %+v, %v; want unchanged %s", again, err, other.Version)
	}
}

// TestDeployDuringExecution is the package half of the e2e test: an
// execution holding a lease keeps its files through any number of deploys,
// and they go once it ends.
func TestDeployDuringExecution(t *testing.T) {
	env := newTestEnv(t, Options{Keep: -1})
	v1 := env.deploy(t, "fn", "main.sh", zipOf(t, exe("main.sh", "v1"), file("data", "one")))
	running, err := env.store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	var latest Deployment
	for i := 2; i <= 4; i++ {
		latest = env.deploy(t, "fn", "main.sh", zipOf(t, exe("main.sh", fmt.Sprint("v", i)), file("data", fmt.Sprint(i))))
	}
	for name, want := range map[string]string{"main.sh": "v1", "data": "one"} {
		got, err := os.ReadFile(filepath.Join(running.Dir, name))
		if err != nil || string(got) != want {
			t.Errorf("running execution reads %s = %q, %v; want %q", name, got, err, want)
		}
	}
	if got := versionsOnDisk(t, env.apps, "fn"); !cmp.Equal(got, []string{v1.Version, latest.Version}) {
		t.Errorf("versions on disk = %v, want the leased %s and the current %s", got, v1.Version, latest.Version)
	}
	next, err := env.store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer next.Release()
	if got, _ := os.ReadFile(filepath.Join(next.Dir, "main.sh")); string(got) != "v4" {
		t.Errorf("a new execution reads main.sh = %q, want v4", got)
	}

	running.Release()
	running.Release() // idempotent: must not release someone else's pin
	want := []string{latest.Version}
	if got := settledVersionsOnDisk(t, env.apps, "fn", func(v []string) bool { return cmp.Equal(v, want) }); !cmp.Equal(got, want) {
		t.Errorf("after release, versions on disk = %v, want only %s", got, latest.Version)
	}
	if _, err := os.Stat(next.Dir); err != nil {
		t.Errorf("the current version went away with another lease's release: %v", err)
	}
}

func TestKeepsRecentVersions(t *testing.T) {
	env := newTestEnv(t, Options{Keep: 2})
	var versions []string
	for i := range 5 {
		d := env.deploy(t, "fn", "main.sh", zipOf(t, exe("main.sh", fmt.Sprint(i))))
		versions = append(versions, d.Version)
	}
	if got := versionsOnDisk(t, env.apps, "fn"); !cmp.Equal(got, versions[2:]) {
		t.Errorf("versions on disk = %v, want the last three %v", got, versions[2:])
	}
}

func TestConcurrentDeploys(t *testing.T) {
	env := newTestEnv(t, Options{Keep: 1})
	const deploys = 6
	results := make([]Deployment, deploys*2)
	errs := make([]error, deploys*2)
	var wg sync.WaitGroup
	for i := range deploys * 2 {
		name := []string{"one", "two"}[i%2]
		archive := zipOf(t, exe("main.sh", fmt.Sprint(i)), file(fmt.Sprintf("lib/f%d", i), strings.Repeat("x", 1000)))
		wg.Go(func() {
			results[i], errs[i] = env.store.Deploy(context.Background(), name, "main.sh", archive)
		})
	}
	// Executions start while the deploys run.
	var leases []*Lease
	for range 20 {
		if l, err := env.store.Acquire("one"); err == nil {
			leases = append(leases, l)
		}
	}
	wg.Wait()
	for _, l := range leases {
		if _, err := os.Stat(filepath.Join(l.Dir, "main.sh")); err != nil {
			t.Errorf("leased version lost its handler: %v", err)
		}
		l.Release()
	}
	seen := make(map[string]bool)
	for i, err := range errs {
		if err != nil {
			t.Fatalf("deploy %d: %v", i, err)
		}
		if seen[results[i].Version] {
			t.Errorf("version %s made twice", results[i].Version)
		}
		seen[results[i].Version] = true
	}
	for _, name := range []string{"one", "two"} {
		got := settledVersionsOnDisk(t, env.apps, name, func(v []string) bool { return len(v) == 2 })
		if len(got) != 2 {
			t.Errorf("%s: versions on disk = %v, want current + 1 kept", name, got)
		}
		for _, v := range got {
			if strings.HasPrefix(v, ".") {
				t.Errorf("%s: leftover %s", name, v)
			}
		}
	}
}

func TestDeploysOfOneFunctionSerialise(t *testing.T) {
	env := newTestEnv(t, Options{})
	env.deploy(t, "busy", "main.sh", goodArchive(t))
	env.store.mu.Lock()
	busy := env.store.functions["busy"]
	env.store.mu.Unlock()
	busy.deploying <- struct{}{} // a deploy of "busy" is in progress

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := env.store.Deploy(ctx, "busy", "main.sh", zipOf(t, exe("main.sh", "second")))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second deploy of a busy function = %v, want it to wait until its deadline", err)
	}
	if _, err := env.store.Deploy(context.Background(), "other", "main.sh", goodArchive(t)); err != nil {
		t.Errorf("deploy of another function while one is busy: %v", err)
	}
	<-busy.deploying
	if _, err := env.store.Deploy(context.Background(), "busy", "main.sh", zipOf(t, exe("main.sh", "second"))); err != nil {
		t.Errorf("deploy once the first is done: %v", err)
	}
}

func TestDeployCancelledLeavesNothing(t *testing.T) {
	env := newTestEnv(t, Options{})
	prev := env.deploy(t, "fn", "main.sh", goodArchive(t))
	before := snapshot(t, env.tmp)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := env.store.Deploy(ctx, "fn", "main.sh", benchArchiveSmall(t))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Deploy with a cancelled context = %v, want context.Canceled", err)
	}
	if diff := cmp.Diff(before, snapshot(t, env.tmp)); diff != "" {
		t.Errorf("a cancelled deploy changed files (-before +after):\n%s", diff)
	}
	lease, err := env.store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	if lease.Version != prev.Version {
		t.Errorf("current = %s, want %s", lease.Version, prev.Version)
	}
}

// benchArchiveSmall is enough files that extraction is under way when a
// cancellation is noticed.
func benchArchiveSmall(tb testing.TB) []byte {
	members := []member{exe("main.sh", "x")}
	for i := range 50 {
		members = append(members, file(fmt.Sprintf("d/f%d", i), strings.Repeat("y", 4096)))
	}
	return zipOf(tb, members...)
}

// TestCopyCountsRealBytes checks the byte budget against what the
// decompressor yields, not what the headers declare.
func TestCopyCountsRealBytes(t *testing.T) {
	archive := zipOf(t, exe("main.sh", "x"), file("big", strings.Repeat("z", 10000)))
	env := newTestEnv(t, Options{})
	store := env.store
	zr := mustZipReader(t, archive)
	p, err := planArchive(zr, int64(len(archive)), "main.sh", store.limits)
	if err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(env.tmp)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if err := root.Mkdir("v", 0o755); err != nil {
		t.Fatal(err)
	}
	vroot, err := root.OpenRoot("v")
	if err != nil {
		t.Fatal(err)
	}
	defer vroot.Close()
	x := &extraction{root: vroot, plan: p, budget: 5000, overLimit: "the test's 5000 bytes"}
	err = x.run(context.Background())
	var entryErr *EntryError
	if !errors.As(err, &entryErr) || !errors.Is(err, ErrTooLarge) || entryErr.Entry != "big" {
		t.Fatalf("extraction over budget = %v, want ErrTooLarge naming \"big\"", err)
	}
	if got := x.written.Load(); got > 5000+copyBufferSize {
		t.Errorf("counted %d bytes before stopping; it should stop within one buffer of the budget", got)
	}
}

func TestOpenRecoversFromCrash(t *testing.T) {
	env := newTestEnv(t, Options{Keep: 1})
	var versions []string
	for i := range 3 {
		versions = append(versions, env.deploy(t, "fn", "main.sh", zipOf(t, exe("main.sh", fmt.Sprint(i)))).Version)
	}
	if err := env.store.Close(); err != nil {
		t.Fatal(err)
	}
	fnDir := filepath.Join(env.apps, "fn")
	// What a crash can leave: a half-extracted stage, a half-removed old
	// version, a pointer never renamed, a version never made current.
	for _, d := range []string{".new-000009-aaaaaaaaaaaa/lib", ".old-000001-bbbbbbbbbbbb/x", "000008-cccccccccccc/y"} {
		if err := os.MkdirAll(filepath.Join(fnDir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(fnDir, pointerTemp), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A deploy of a new function that crashed before its first switch.
	if err := os.MkdirAll(filepath.Join(env.apps, "fresh", "000001-dddddddddddd"), 0o755); err != nil {
		t.Fatal(err)
	}

	store, err := Open(env.apps, Options{Keep: 1})
	if err != nil {
		t.Fatal(err)
	}
	env.store = store
	if got := versionsOnDisk(t, env.apps, "fn"); !cmp.Equal(got, versions[1:]) {
		t.Errorf("after Open, versions = %v, want %v", got, versions[1:])
	}
	if got := versionsOnDisk(t, env.apps, "fresh"); len(got) != 0 {
		t.Errorf("after Open, fresh has %v, want nothing", got)
	}
	if _, err := store.Acquire("fresh"); !errors.Is(err, ErrNotDeployed) {
		t.Errorf("Acquire(fresh) = %v, want ErrNotDeployed", err)
	}
	lease, err := store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	if lease.Version != versions[2] {
		t.Errorf("current after Open = %s, want %s", lease.Version, versions[2])
	}
	// The next version must sort after everything seen, even removed ones.
	d := env.deploy(t, "fn", "main.sh", zipOf(t, exe("main.sh", "next")))
	if seq, _ := parseVersion(d.Version); seq <= 9 {
		t.Errorf("next version %s reuses a sequence number", d.Version)
	}
}

func TestNeverFollowsSymlinksOnDisk(t *testing.T) {
	env := newTestEnv(t, Options{})
	victim := filepath.Join(env.tmp, "outside", "victim")
	outside := filepath.Join(env.tmp, "outside")

	// A function dir that is a symlink is refused, not followed.
	if err := os.Symlink(outside, filepath.Join(env.apps, "planted")); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, env.tmp)
	if _, err := env.store.Deploy(context.Background(), "planted", "main.sh", goodArchive(t)); err == nil {
		t.Error("deploy into a symlinked function dir succeeded")
	}
	if diff := cmp.Diff(before, snapshot(t, env.tmp)); diff != "" {
		t.Errorf("deploy through a planted symlink changed files (-before +after):\n%s", diff)
	}

	// Symlinks planted where the deploy writes its pointer and stage.
	env.deploy(t, "fn", "main.sh", goodArchive(t))
	fnDir := filepath.Join(env.apps, "fn")
	archive := zipOf(t, exe("main.sh", "v2"))
	env.store.mu.Lock()
	stage := stagePrefix + versionName(env.store.functions["fn"].lastSeq+1, digestOf("main.sh", archive))
	env.store.mu.Unlock()
	for _, name := range []string{pointerTemp, stage} {
		if err := os.Symlink(victim, filepath.Join(fnDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	_, err := env.store.Deploy(context.Background(), "fn", "main.sh", archive)
	if err == nil {
		t.Error("deploy over a planted stage symlink succeeded")
	}
	if got, _ := os.ReadFile(victim); string(got) != "secret" {
		t.Errorf("victim now holds %q", got)
	}
	if fi, _ := os.Stat(victim); fi.Mode() != 0o600 {
		t.Errorf("victim mode is now %v", fi.Mode())
	}
}

func TestLeaseHandler(t *testing.T) {
	env := newTestEnv(t, Options{})
	env.deploy(t, "fn", "main.sh", zipOf(t,
		exe("main.sh", "x"),
		exe("bin/real", "y"),
		symlink("bin/alias", "real"),
		dir("lib/"),
	))
	lease, err := env.store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	// A symlink no archive can carry, as if the version had been tampered with.
	if err := os.Symlink(filepath.Join(env.tmp, "outside", "victim"), filepath.Join(lease.Dir, "escape")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		handler string
		want    string
		err     error
	}{
		{handler: "main.sh", want: filepath.Join(lease.Dir, "main.sh")},
		{handler: "bin/alias", want: filepath.Join(lease.Dir, "bin", "real")},
		{handler: "missing.sh", err: ErrHandlerMissing},
		{handler: "lib", err: ErrHandlerMissing},
		{handler: "escape", err: ErrHandlerOutside},
		{handler: "../fn/main.sh", err: ErrInvalidHandler},
		{handler: "/bin/sh", err: ErrInvalidHandler},
	} {
		got, err := lease.Handler(c.handler)
		if got != c.want || !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("Handler(%q) = %q, %v; want %q, %v", c.handler, got, err, c.want, c.err)
		}
	}
}

func TestAcquireAndDeployRefusals(t *testing.T) {
	env := newTestEnv(t, Options{})
	if _, err := env.store.Acquire("never"); !errors.Is(err, ErrNotDeployed) {
		t.Errorf("Acquire(never) = %v, want ErrNotDeployed", err)
	}
	if _, err := env.store.Acquire("../../tmp/evil"); !errors.Is(err, ErrInvalidName) {
		t.Errorf("Acquire(../../tmp/evil) = %v, want ErrInvalidName", err)
	}
	before := snapshot(t, env.tmp)
	if _, err := env.store.Deploy(context.Background(), "../../tmp/evil", "main.sh", goodArchive(t)); !errors.Is(err, ErrInvalidName) {
		t.Errorf("Deploy(../../tmp/evil) = %v, want ErrInvalidName", err)
	}
	if _, err := env.store.Deploy(context.Background(), "fn", "../main.sh", goodArchive(t)); !errors.Is(err, ErrInvalidHandler) {
		t.Errorf("Deploy with handler ../main.sh = %v, want ErrInvalidHandler", err)
	}
	if diff := cmp.Diff(before, snapshot(t, env.tmp)); diff != "" {
		t.Errorf("refused calls changed files (-before +after):\n%s", diff)
	}
	env.deploy(t, "fn", "main.sh", goodArchive(t))
	if err := env.store.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := env.store.Acquire("fn"); !errors.Is(err, ErrClosed) {
		t.Errorf("Acquire after Close = %v, want ErrClosed", err)
	}
	if _, err := env.store.Deploy(context.Background(), "fn", "main.sh", goodArchive(t)); !errors.Is(err, ErrClosed) {
		t.Errorf("Deploy after Close = %v, want ErrClosed", err)
	}
}

func TestCloseStopsWaitingDeploys(t *testing.T) {
	env := newTestEnv(t, Options{})
	env.deploy(t, "busy", "main.sh", goodArchive(t))
	env.store.mu.Lock()
	busy := env.store.functions["busy"]
	env.store.mu.Unlock()
	busy.deploying <- struct{}{} // an earlier deploy never finishes
	defer func() { <-busy.deploying }()

	done := make(chan error)
	second := zipOf(t, exe("main.sh", "second"))
	go func() {
		_, err := env.store.Deploy(context.Background(), "busy", "main.sh", second)
		done <- err
	}()
	if err := env.store.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("deploy stopped by Close = %v, want ErrClosed", err)
	}
	if got := versionsOnDisk(t, env.apps, "busy"); len(got) != 1 {
		t.Errorf("versions on disk after Close = %v, want only the first", got)
	}
}

// A first deploy that fails while extracting (a corrupt member found only
// when it is read) leaves no function dir behind.
func TestFailedFirstDeployLeavesNothing(t *testing.T) {
	env := newTestEnv(t, Options{})
	before := snapshot(t, env.tmp)
	corrupt := rawZip(t, exe("main.sh", "x"), rawMember{name: "lib/a.txt", method: zip.Store, data: []byte("hello"), size: 5, crc: 1})
	if _, err := env.store.Deploy(context.Background(), "fresh", "main.sh", corrupt); !errors.Is(err, ErrBadArchive) {
		t.Fatalf("Deploy = %v, want ErrBadArchive", err)
	}
	if diff := cmp.Diff(before, snapshot(t, env.tmp)); diff != "" {
		t.Errorf("a failed first deploy changed files (-before +after):\n%s", diff)
	}
	if _, err := env.store.Deploy(context.Background(), "fresh", "main.sh", goodArchive(t)); err != nil {
		t.Errorf("a later deploy: %v", err)
	}
}
