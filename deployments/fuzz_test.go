package deployments

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzExtract deploys arbitrary bytes as an archive. Whatever the input, the
// deploy either succeeds or is refused with ErrBadArchive or ErrTooLarge;
// nothing appears outside the apps dir; a refusal leaves no files; a success
// leaves only the version and its pointer, with the promised modes, and every
// symlink resolving inside the version.
//
// Seeds: testdata/fuzz/FuzzExtract (rewritten with
// go test ./deployments/ -run TestHostileArchives -update).
func FuzzExtract(f *testing.F) {
	f.Add(goodArchive(f))
	f.Fuzz(func(t *testing.T, archive []byte) {
		checkDeploy(t, archive)
	})
}

// checkDeploy deploys archive into a fresh apps dir and checks the
// invariants every deploy must keep, whatever it is given.
func checkDeploy(t *testing.T, archive []byte) {
	tmp := t.TempDir()
	apps := filepath.Join(tmp, "apps")
	store, err := Open(apps, Options{Limits: Limits{MaxBytes: 4 << 20, MaxFiles: 200}})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()

	d, deployErr := store.Deploy(context.Background(), "fn", "main.sh", archive)
	if deployErr != nil && !errors.Is(deployErr, ErrBadArchive) && !errors.Is(deployErr, ErrTooLarge) {
		t.Fatalf("Deploy failed with an unexpected kind of error: %v", deployErr)
	}
	prefix := filepath.Join("apps", "fn", d.Version) + string(filepath.Separator)
	allowed := map[string]bool{".": true, "apps": true, filepath.Join("apps", "fn"): true}
	if deployErr == nil {
		allowed[filepath.Join("apps", "fn", currentFile)] = true
		allowed[filepath.Join("apps", "fn", d.Version)] = true
	}
	walkErr := filepath.WalkDir(tmp, func(path string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(tmp, path)
		if allowed[rel] {
			return nil
		}
		if deployErr != nil || !strings.HasPrefix(rel, prefix) {
			t.Errorf("unexpected path %s after Deploy (error %v)", rel, deployErr)
			return nil
		}
		checkInstalled(t, filepath.Join(tmp, prefix), path, de)
		return nil
	})
	if walkErr != nil {
		t.Fatal(walkErr)
	}
	if deployErr != nil {
		return
	}
	lease, err := store.Acquire("fn")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	if _, err := lease.Handler("main.sh"); err != nil {
		t.Errorf("deployed, but the handler does not check out: %v", err)
	}
}

// checkInstalled checks one installed path against the package's promises.
func checkInstalled(t *testing.T, versionDir, path string, de fs.DirEntry) {
	t.Helper()
	fi, err := de.Info()
	if err != nil {
		t.Fatal(err)
	}
	switch mode := fi.Mode(); {
	case mode&fs.ModeSymlink != 0:
		resolved, err := filepath.EvalSymlinks(path)
		if err != nil {
			return // dangling or a loop: leads nowhere
		}
		realDir, err := filepath.EvalSymlinks(versionDir)
		if err != nil {
			t.Fatal(err)
		}
		rel, err := filepath.Rel(realDir, resolved)
		if err != nil || !filepath.IsLocal(rel) {
			t.Errorf("symlink %s resolves outside the version, to %s", path, resolved)
		}
	case mode.IsDir():
		if mode != fs.ModeDir|0o755 {
			t.Errorf("directory %s has mode %v, want drwxr-xr-x", path, mode)
		}
	case mode.IsRegular():
		if mode != 0o644 && mode != 0o755 {
			t.Errorf("file %s has mode %v, want -rw-r--r-- or -rwxr-xr-x", path, mode)
		}
	default:
		t.Errorf("%s has type %v; only files, directories and symlinks may be installed", path, mode.Type())
	}
	if _, err := os.Lstat(path); err != nil {
		t.Error(err)
	}
}

// FuzzLayout explores archive shapes rather than zip bytes: each line of
// layout is "<kind> <name> [<body or link target>]" with kind f (file),
// x (executable), d (directory) or l (symlink), so the fuzzer reaches names,
// nesting and symlink topologies that random bytes rarely form into a valid
// zip. The invariants are FuzzExtract's.
func FuzzLayout(f *testing.F) {
	for _, seed := range []string{
		"x main.sh echo\nd lib/\nf lib/a.txt a\nl lib/link a.txt",
		"x main.sh\nl here .\nd lib/\nl lib/up ../here/..",
		"l main.sh bin/run\nx bin/run\nl bin/alias run",
		"x main.sh\nl a lib/b\nd lib/\nl lib/b ../c\nl c ..",
		"x main.sh\nl out lib\nd lib/\nf out/evil x",
		"x main.sh\nl a b\nl b a",
		"x main.sh\nf ../evil x",
		"x main.sh\nl node_modules/.bin/tool ../tool/cli.js\nx node_modules/tool/cli.js",
		"x real\nl main.sh real/",
		"x real\nl f real\nl main.sh f/../real",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, layout string) {
		var members []member
		for line := range strings.Lines(layout) {
			kind, rest, _ := strings.Cut(strings.TrimSuffix(line, "\n"), " ")
			name, body, _ := strings.Cut(rest, " ")
			if strings.HasSuffix(name, "/") {
				body = "" // zip holds no content for a directory name
			}
			switch kind {
			case "f":
				members = append(members, file(name, body))
			case "x":
				members = append(members, exe(name, body))
			case "d":
				members = append(members, dir(name))
			case "l":
				members = append(members, symlink(name, body))
			}
		}
		checkDeploy(t, zipOf(t, members...))
	})
}
