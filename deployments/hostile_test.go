package deployments

import (
	"archive/zip"
	"bytes"
	"compress/flate"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite testdata/hostile and the fuzz seed corpus from the builders in hostile_test.go")

// outsideProbe is an absolute path a naive extractor would write to.
const outsideProbe = "/tmp/flux-agent-deployments-test-evil"

// hostileCase is one archive the store must refuse, and how.
type hostileCase struct {
	name    string // fixture file: testdata/hostile/<name>.zip
	build   func(tb testing.TB) []byte
	limits  Limits
	handler string // default "main.sh"
	want    error  // sentinel the error wraps
	entry   string // the entry EntryError must name; "" when the error is about the whole archive
}

func hostileCases() []hostileCase {
	ok := exe("main.sh", "#!/bin/sh\necho hostile\n")
	zipped := func(members ...member) func(testing.TB) []byte {
		return func(tb testing.TB) []byte { return zipOf(tb, members...) }
	}
	return []hostileCase{
		{name: "absolute-path", build: zipped(ok, file(outsideProbe, "x")), want: ErrBadArchive, entry: outsideProbe},
		{name: "dotdot-escape", build: zipped(ok, file("../../../outside/evil", "x")), want: ErrBadArchive, entry: "../../../outside/evil"},
		{name: "dotdot-deep-escape", build: zipped(ok, file("lib/../../../../outside/evil", "x")), want: ErrBadArchive, entry: "lib/../../../../outside/evil"},
		{name: "dotdot-inside", build: zipped(ok, file("lib/../other.txt", "x")), want: ErrBadArchive, entry: "lib/../other.txt"},
		{name: "dotdot-dir", build: zipped(ok, dir("lib/../")), want: ErrBadArchive, entry: "lib/../"},
		{name: "backslash", build: zipped(ok, file(`..\..\outside\evil`, "x")), want: ErrBadArchive, entry: `..\..\outside\evil`},
		{name: "nul-in-name", build: zipped(ok, file("evil\x00.txt", "x")), want: ErrBadArchive, entry: "evil\x00.txt"},
		{name: "name-too-long", build: zipped(ok, file(strings.Repeat("d/", 1100)+"f", "x")), want: ErrBadArchive, entry: strings.Repeat("d/", 1100) + "f"},
		{name: "name-too-deep", build: zipped(ok, file(strings.Repeat("d/", 65)+"f", "x")), want: ErrBadArchive, entry: strings.Repeat("d/", 65) + "f"},
		{name: "implied-dirs-over-limit", build: zipped(ok, file("a/b/c/d/e/f/g/h/i/j/k", "x")), limits: Limits{MaxFiles: 8}, want: ErrTooLarge, entry: "a/b/c/d/e/f/g/h/i/j/k"},
		{name: "name-element-too-long", build: zipped(ok, file("lib/"+strings.Repeat("n", 256), "x")), want: ErrBadArchive, entry: "lib/" + strings.Repeat("n", 256)},
		{name: "duplicate-file", build: zipped(ok, file("a.txt", "1"), file("a.txt", "2")), want: ErrBadArchive, entry: "a.txt"},
		{name: "duplicate-handler", build: zipped(ok, exe("main.sh", "#!/bin/sh\necho second\n")), want: ErrBadArchive, entry: "main.sh"},
		{name: "duplicate-clean-name", build: zipped(ok, file("lib/a.txt", "1"), file("lib//./a.txt", "2")), want: ErrBadArchive, entry: "lib//./a.txt"},
		{name: "file-and-dir", build: zipped(ok, file("lib", "x"), dir("lib/")), want: ErrBadArchive, entry: "lib/"},
		{name: "file-under-file", build: zipped(ok, file("lib", "x"), file("lib/a.txt", "y")), want: ErrBadArchive, entry: "lib/a.txt"},
		{name: "symlink-absolute", build: zipped(ok, symlink("passwd", "/etc/passwd")), want: ErrBadArchive, entry: "passwd"},
		{name: "symlink-escape", build: zipped(ok, symlink("out", "../../../outside")), want: ErrBadArchive, entry: "out"},
		{name: "symlink-escape-from-subdir", build: zipped(ok, symlink("lib/deep/out", "../../..")), want: ErrBadArchive, entry: "lib/deep/out"},
		{name: "symlink-escape-through-link", build: zipped(ok, dir("lib/"), symlink("here", "."), symlink("lib/up", "../here/..")), want: ErrBadArchive, entry: "lib/up"},
		{name: "symlink-escape-chain", build: zipped(ok, symlink("a", "lib/b"), dir("lib/"), symlink("lib/b", "../c"), symlink("c", "..")), want: ErrBadArchive, entry: "a"},
		{name: "write-through-symlink", build: zipped(ok, symlink("out", "lib"), dir("lib/"), file("out/evil", "x")), want: ErrBadArchive, entry: "out/evil"},
		{name: "write-through-escaping-symlink", build: zipped(ok, symlink("out", "../../../outside"), file("out/evil", "x")), want: ErrBadArchive, entry: "out/evil"},
		{name: "symlink-loop", build: zipped(ok, symlink("a", "b"), symlink("b", "a"), symlink("c", "a/x")), want: ErrBadArchive, entry: "a"},
		{name: "symlink-backslash", build: zipped(ok, symlink("out", `..\..\outside`)), want: ErrBadArchive, entry: "out"},
		{name: "handler-symlink-outside", build: zipped(symlink("main.sh", "../../../outside/victim")), want: ErrBadArchive, entry: "main.sh"},
		{name: "device", build: zipped(ok, special("dev", fs.ModeDevice)), want: ErrBadArchive, entry: "dev"},
		{name: "char-device", build: zipped(ok, special("tty", fs.ModeDevice|fs.ModeCharDevice)), want: ErrBadArchive, entry: "tty"},
		{name: "fifo", build: zipped(ok, special("fifo", fs.ModeNamedPipe)), want: ErrBadArchive, entry: "fifo"},
		{name: "socket", build: zipped(ok, special("sock", fs.ModeSocket)), want: ErrBadArchive, entry: "sock"},
		{name: "empty-zip", build: zipped(), want: ErrBadArchive},
		{name: "zero-bytes", build: func(testing.TB) []byte { return nil }, want: ErrBadArchive},
		{name: "not-a-zip", build: func(testing.TB) []byte { return []byte("#!/bin/sh\necho this is not a zip\n") }, want: ErrBadArchive},
		{name: "truncated", build: func(tb testing.TB) []byte {
			z := zipOf(tb, ok, file("lib/a.txt", strings.Repeat("data ", 1000)))
			return z[:len(z)/2]
		}, want: ErrBadArchive},
		{name: "corrupt-deflate", build: func(tb testing.TB) []byte {
			return rawZip(tb, ok, rawMember{name: "lib/a.txt", method: zip.Deflate, data: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, size: 100})
		}, want: ErrBadArchive, entry: "lib/a.txt"},
		{name: "bad-checksum", build: func(tb testing.TB) []byte {
			return rawZip(tb, ok, rawMember{name: "lib/a.txt", method: zip.Store, data: []byte("hello"), size: 5, crc: 1})
		}, want: ErrBadArchive, entry: "lib/a.txt"},
		{name: "header-understates-size", build: func(tb testing.TB) []byte {
			return rawZip(tb, ok, rawMember{name: "lib/zeros", method: zip.Deflate, data: deflated(tb, 1<<20), size: 10})
		}, want: ErrBadArchive, entry: "lib/zeros"},
		{name: "too-many-files", build: func(tb testing.TB) []byte {
			members := []member{ok}
			for i := range 10 {
				members = append(members, file(fmt.Sprintf("f%d", i), "x"))
			}
			return zipOf(tb, members...)
		}, limits: Limits{MaxFiles: 10}, want: ErrTooLarge},
		{name: "too-many-bytes", build: zipped(ok, file("lib/big", strings.Repeat("0123456789", 200))), limits: Limits{MaxBytes: 1000}, want: ErrTooLarge, entry: "lib/big"},
		{name: "bomb-1gib-zeros", build: func(tb testing.TB) []byte {
			return rawZip(tb, ok, rawMember{name: "zeros", method: zip.Deflate, data: deflated(tb, 1<<30), size: 1 << 30, crcOfZeros: true})
		}, want: ErrTooLarge, entry: "zeros"},
		{name: "handler-missing", build: zipped(file("other.sh", "x")), want: ErrBadArchive},
		{name: "handler-is-dir", build: zipped(dir("main.sh/"), file("main.sh/x", "x")), want: ErrBadArchive},
		{name: "handler-link-to-file-as-dir", build: zipped(exe("real", "x"), symlink("main.sh", "real/")), want: ErrBadArchive},
		{name: "handler-through-file-dotdot", build: zipped(exe("real", "x"), symlink("f", "real"), symlink("main.sh", "f/../real")), want: ErrBadArchive},
		{name: "handler-dangling-link", build: zipped(symlink("main.sh", "nowhere.sh")), want: ErrBadArchive},
	}
}

// rawMember is an entry written with arbitrary compressed data and headers.
type rawMember struct {
	name       string
	method     uint16
	data       []byte
	size       uint64
	crc        uint32
	crcOfZeros bool // crc is that of size zero bytes
}

// rawZip builds an archive of good members followed by one raw member whose
// headers say whatever the case needs.
func rawZip(tb testing.TB, good member, raw rawMember) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: good.Name, Method: zip.Deflate}
	h.SetMode(good.Mode)
	w, err := zw.CreateHeader(h)
	if err == nil {
		_, err = io.WriteString(w, good.Body)
	}
	if err != nil {
		tb.Fatal(err)
	}
	crc := raw.crc
	if raw.crcOfZeros {
		crc = crcOfZeros(raw.size)
	}
	rh := &zip.FileHeader{Name: raw.name, Method: raw.method, CRC32: crc,
		CompressedSize64: uint64(len(raw.data)), UncompressedSize64: raw.size}
	rh.SetMode(0o644)
	w, err = zw.CreateRaw(rh)
	if err == nil {
		_, err = w.Write(raw.data)
	}
	if err == nil {
		err = zw.Close()
	}
	if err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// deflated returns n zero bytes compressed.
func deflated(tb testing.TB, n int64) []byte {
	tb.Helper()
	var buf bytes.Buffer
	fw, err := flate.NewWriter(&buf, flate.BestCompression)
	if err != nil {
		tb.Fatal(err)
	}
	zeros := make([]byte, 1<<20)
	for written := int64(0); written < n; written += int64(len(zeros)) {
		if _, err := fw.Write(zeros[:min(int64(len(zeros)), n-written)]); err != nil {
			tb.Fatal(err)
		}
	}
	if err := fw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func crcOfZeros(n uint64) uint32 {
	zeros := make([]byte, 1<<20)
	var crc uint32
	for n > 0 {
		k := min(n, uint64(len(zeros)))
		crc = crc32.Update(crc, crc32.IEEETable, zeros[:k])
		n -= k
	}
	return crc
}

// fixture reads testdata/hostile/<name>.zip, writing it first with -update.
func fixture(t *testing.T, c hostileCase) []byte {
	t.Helper()
	path := filepath.Join("testdata", "hostile", c.name+".zip")
	if *update {
		archive := c.build(t)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, archive, 0o644); err != nil {
			t.Fatal(err)
		}
		if len(archive) <= maxFuzzSeed {
			writeFuzzSeed(t, "hostile-"+c.name, archive)
		}
	}
	archive, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run TestHostileArchives -update ./deployments/)", err)
	}
	return archive
}

// maxFuzzSeed keeps the seed corpus small: larger archives only slow the
// fuzzer down.
const maxFuzzSeed = 64 << 10

// writeFuzzSeed stores archive in FuzzExtract's seed corpus.
func writeFuzzSeed(t *testing.T, name string, archive []byte) {
	t.Helper()
	path := filepath.Join("testdata", "fuzz", "FuzzExtract", name)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	seed := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", archive)
	if err := os.WriteFile(path, []byte(seed), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestHostileArchives deploys every hostile fixture over a good version and
// checks the refusal, that nothing changed anywhere on disk (outside the
// apps dir, the previous version, leftovers), and that the previous version
// is still the one executions get.
func TestHostileArchives(t *testing.T) {
	if *update {
		writeFuzzSeed(t, "good", goodArchive(t))
	}
	for _, c := range hostileCases() {
		t.Run(c.name, func(t *testing.T) {
			archive := fixture(t, c)
			env := newTestEnv(t, Options{Limits: c.limits})
			prev := env.deploy(t, "fn", "main.sh", goodArchive(t))
			before := snapshot(t, env.tmp)

			handler := c.handler
			if handler == "" {
				handler = "main.sh"
			}
			_, err := env.store.Deploy(context.Background(), "fn", handler, archive)
			if !errors.Is(err, c.want) {
				t.Fatalf("Deploy error = %v, want one wrapping %v", err, c.want)
			}
			var entryErr *EntryError
			gotEntry := ""
			if errors.As(err, &entryErr) {
				gotEntry = entryErr.Entry
			}
			if gotEntry != c.entry {
				t.Errorf("error names entry %q, want %q (error: %v)", gotEntry, c.entry, err)
			}
			t.Logf("refused: %v", err)

			if diff := cmp.Diff(before, snapshot(t, env.tmp)); diff != "" {
				t.Errorf("a refused deploy changed files (-before +after):\n%s", diff)
			}
			if _, err := os.Lstat(outsideProbe); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s exists after the deploy (Lstat: %v)", outsideProbe, err)
			}
			lease, err := env.store.Acquire("fn")
			if err != nil {
				t.Fatal(err)
			}
			defer lease.Release()
			if lease.Version != prev.Version {
				t.Errorf("current version = %s after a refused deploy, want the previous %s", lease.Version, prev.Version)
			}
		})
	}
}

// goodArchive is a small valid function: a handler, a library file, an
// executable helper and an inside symlink.
func goodArchive(tb testing.TB) []byte {
	return zipOf(tb,
		exe("main.sh", "#!/bin/sh\necho good\n"),
		dir("lib/"),
		file("lib/a.txt", "library"),
		exe("lib/helper", "#!/bin/sh\n"),
		symlink("lib/link", "a.txt"),
	)
}

// testEnv is a temporary directory holding the apps dir and, beside it, an
// "outside" directory with a victim file that hostile archives aim at.
type testEnv struct {
	tmp, apps string
	store     *Store
}

func newTestEnv(t *testing.T, opts Options) *testEnv {
	t.Helper()
	tmp := t.TempDir()
	env := &testEnv{tmp: tmp, apps: filepath.Join(tmp, "apps")}
	if err := os.MkdirAll(filepath.Join(tmp, "outside"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "outside", "victim"), []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	store, err := Open(env.apps, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := store.Close(); err != nil {
			t.Error(err)
		}
	})
	env.store = store
	return env
}

func (env *testEnv) deploy(t *testing.T, name, handler string, archive []byte) Deployment {
	t.Helper()
	d, err := env.store.Deploy(context.Background(), name, handler, archive)
	if err != nil {
		t.Fatalf("Deploy(%s): %v", name, err)
	}
	return d
}

// snapshot describes every path under dir without following symlinks: type,
// mode, a digest of the content, or the link target.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	got := make(map[string]string)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			got[rel] = "symlink -> " + target
		case d.IsDir():
			got[rel] = fmt.Sprintf("dir %v", fi.Mode())
		default:
			content, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			got[rel] = fmt.Sprintf("file %v %x", fi.Mode(), sha256.Sum256(content))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestIntricateSymlinksStayCheap feeds the symlink checker the worst shapes
// within the default limits; the step budget must refuse them quickly.
func TestIntricateSymlinksStayCheap(t *testing.T) {
	members := []member{exe("main.sh", "x")}
	// Every link walks a long target through a chain of other links.
	target := strings.Repeat("d/../", 800) + "l0"
	members = append(members, dir("d/"))
	for i := range 2000 {
		members = append(members, symlink(fmt.Sprintf("l%d", i+1), target))
	}
	members = append(members, symlink("l0", "main.sh"))
	archive := zipOf(t, members...)
	env := newTestEnv(t, Options{})
	start := time.Now()
	_, err := env.store.Deploy(context.Background(), "fn", "main.sh", archive)
	if !errors.Is(err, ErrBadArchive) {
		t.Fatalf("Deploy = %v, want ErrBadArchive", err)
	}
	t.Logf("refused in %v: %v", time.Since(start), err)
}
