// Package deployments installs each function's code from the zip Flux sends,
// safely against any archive and without ever pulling files from under a
// running execution.
//
// # Layout
//
// Every function has a directory apps_dir/<name>/ holding immutable version
// directories named "<sequence>-<digest>" and a pointer file "current" naming
// the version new executions get. A deploy extracts into a fresh staging
// directory (".new-<version>"), fsyncs every file and directory, renames it to
// its version name, then replaces "current" by writing a temporary file and
// renaming it over the old one: the switch is a single atomic rename, and a
// crash at any point leaves either the old version or the new one current.
// A pointer file rather than a symlink keeps the switch the same on Windows,
// where creating symlinks needs a privilege.
//
// Executions pin the version they start with (Store.Acquire returns a Lease).
// A version that is neither current, nor among the newest Options.Keep older
// ones, nor leased is removed; a leased one is removed when its last lease is
// released. Open removes what a crash left: staging and half-removed
// directories, and versions that never became current.
//
// # Hostile archives
//
// The whole archive is checked before anything is written: names must be
// relative, clean of ".." elements, NUL and backslashes, and local on the
// platform; duplicates, device, FIFO and socket entries are refused; entry
// count and declared sizes are bounded. Extraction then goes through an
// os.Root opened on the fresh staging directory, creates every file with
// O_EXCL (so nothing on disk, and no symlink, is ever followed or
// overwritten), and counts the bytes actually decompressed against
// Limits.MaxBytes and Limits.MaxRatio × archive size, stopping at the first
// byte over. Every refusal wraps ErrBadArchive or ErrTooLarge and names the
// entry (see EntryError); a failed deploy removes its staging directory and
// leaves the current version untouched.
//
// # Symlinks
//
// Symlinks inside an archive are allowed only when they stay inside the
// version directory, because real function trees carry them (node_modules/.bin,
// shared libraries). A link must be relative, and it must stay inside both
// lexically (target joined to the link's directory) and when followed
// component by component through the archive's other links, as the kernel
// would; loops are refused, dangling links are kept (nothing can ever appear
// at their target, since a version never changes). No entry may sit below a
// symlink, and links are created after every file, so extraction never writes
// through one.
//
// # Files
//
// Files are owned by the agent's user (root in production) and are never
// chowned: functions run as the unprivileged runner, which can read and
// execute its code but not rewrite it or another function's. Files are 0644,
// or 0755 when the archive marks any execute bit, and the handler is always
// 0755; setuid, setgid and sticky bits are never kept. Directories are 0755.
// Modes are set explicitly after creation, so the agent's umask cannot make
// the code unreadable to the runner.
package deployments

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	// ErrNotDeployed is returned by Acquire for a function without code.
	ErrNotDeployed = errors.New("function not deployed")
	// ErrHandlerOutside is returned when a handler resolves, through
	// symlinks, to a place outside the function's code.
	ErrHandlerOutside = errors.New("handler resolves outside the function's code")
	// ErrHandlerMissing is returned when a handler names no regular file in
	// the function's code.
	ErrHandlerMissing = errors.New("handler is not a file in the function's code")
	// ErrClosed is returned by calls made after Close.
	ErrClosed = errors.New("deployment store closed")
)

// DefaultKeep is how many versions besides the current one are kept, so
// recent code can still be inspected after a bad deploy.
const DefaultKeep = 2

// Names inside a function's directory. Anything starting with '.' is
// transient and removed by Open.
const (
	currentFile  = "current"
	pointerTemp  = ".current.new"
	stagePrefix  = ".new-"
	trashPrefix  = ".old-"
	digestPrefix = 12 // hex digits of the digest in a version name
)

// Options configure a Store; the zero value is the default.
type Options struct {
	// Limits bound every archive; zero fields take DefaultLimits.
	Limits Limits
	// Keep is how many superseded versions are kept besides the current one:
	// 0 means DefaultKeep, a negative value keeps none.
	Keep int
	// Foreign names files another part of the agent keeps in each
	// function's dir (the service's copy of the function's config): the
	// store leaves them alone and does not report them.
	Foreign []string
	// Logger receives deploys and clean-up failures; nil discards.
	Logger *slog.Logger
}

// Store owns apps_dir: it installs code, hands out leases on versions and
// removes versions nobody needs.
type Store struct {
	dir     string // absolute apps_dir
	root    *os.Root
	limits  Limits
	keep    int
	foreign []string
	log     *slog.Logger

	// closing is cancelled by Close, which stops deploys under way.
	closing context.Context
	close   context.CancelFunc

	mu        sync.Mutex
	closed    bool
	functions map[string]*function
	inflight  sync.WaitGroup // deploys running; Close waits for them
}

// function is the in-memory state of one function's directory.
type function struct {
	// deploying is a one-slot semaphore serialising this function's deploys;
	// a channel so that waiting honours the caller's context.
	deploying chan struct{}

	// Guarded by Store.mu.
	current  *record // nil until the first deploy
	versions map[string]*version
	lastSeq  uint64
}

// version is one complete version directory on disk.
type version struct {
	seq    uint64
	leases int
}

// record is what "current" holds: the version and what it was made from, so
// a re-sent identical deploy is recognised without touching the files.
type record struct {
	Version string `json:"version"`
	Digest  string `json:"digest"`
	Handler string `json:"handler"`
	Files   int    `json:"files"`
	Bytes   int64  `json:"bytes"`
}

// Deployment describes the version a Deploy made current.
type Deployment struct {
	// Version names the version directory.
	Version string
	// Files counts the regular files installed; Bytes their total size.
	Files int
	Bytes int64
	// Unchanged is true when the same archive and handler were already
	// current, and nothing was written.
	Unchanged bool
}

// Open takes charge of appsDir, creating it (0755) if missing, and removes
// what a crash left behind: staging directories, versions that never became
// current, and superseded versions beyond Keep.
func Open(appsDir string, opts Options) (*Store, error) {
	dir, err := filepath.Abs(appsDir)
	if err != nil {
		return nil, fmt.Errorf("apps dir %q: %w", appsDir, err)
	}
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create apps dir: %w", err)
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create apps dir: %w", err)
		}
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("open apps dir: %w", err)
	}
	closing, closeFn := context.WithCancel(context.Background())
	s := &Store{
		closing:   closing,
		close:     closeFn,
		dir:       dir,
		root:      root,
		limits:    opts.Limits.withDefaults(),
		keep:      opts.Keep,
		foreign:   opts.Foreign,
		log:       opts.Logger,
		functions: make(map[string]*function),
	}
	if s.keep == 0 {
		s.keep = DefaultKeep
	}
	if s.keep < 0 {
		s.keep = 0
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := s.recover(); err != nil {
		closeFn()
		root.Close()
		return nil, err
	}
	return s, nil
}

// recover loads every function directory and clears what a crash left.
func (s *Store) recover() error {
	d, err := s.root.Open(".")
	if err != nil {
		return fmt.Errorf("read apps dir: %w", err)
	}
	entries, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return fmt.Errorf("read apps dir: %w", err)
	}
	for _, de := range entries {
		name := de.Name()
		if ValidName(name) != nil || !de.IsDir() || de.Type()&fs.ModeSymlink != 0 {
			s.log.Warn("ignoring unexpected entry in apps dir", "dir", s.dir, "entry", name)
			continue
		}
		fn, err := s.recoverFunction(name)
		if err != nil {
			return fmt.Errorf("recover function %q: %w", name, err)
		}
		s.functions[name] = fn
		s.collect(name, fn)
	}
	return nil
}

func (s *Store) recoverFunction(name string) (*function, error) {
	fnRoot, err := s.root.OpenRoot(name)
	if err != nil {
		return nil, err
	}
	defer fnRoot.Close()
	d, err := fnRoot.Open(".")
	if err != nil {
		return nil, err
	}
	entries, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return nil, err
	}
	fn := newFunction()
	if raw, err := fnRoot.ReadFile(currentFile); err == nil {
		var rec record
		if err := json.Unmarshal(raw, &rec); err != nil {
			s.log.Warn("unreadable current-version pointer; function has no current version", "function", name, "err", err)
		} else {
			fn.current = &rec
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	var currentSeq uint64
	if fn.current != nil {
		seq, ok := parseVersion(fn.current.Version)
		fi, err := fnRoot.Lstat(fn.current.Version)
		if !ok || err != nil || !fi.IsDir() {
			s.log.Warn("current-version pointer names no version; function has no current version", "function", name, "version", fn.current.Version)
			fn.current = nil
		}
		currentSeq = seq
	}
	for _, de := range entries {
		entry := de.Name()
		if entry == currentFile {
			continue
		}
		if strings.HasPrefix(entry, ".") {
			for _, prefix := range []string{stagePrefix, trashPrefix} {
				if seq, ok := parseVersion(strings.TrimPrefix(entry, prefix)); ok {
					fn.lastSeq = max(fn.lastSeq, seq)
				}
			}
			s.removeLogged(fnRoot, name, entry, "left by an interrupted deploy")
			continue
		}
		seq, ok := parseVersion(entry)
		if !ok || !de.IsDir() {
			if !slices.Contains(s.foreign, entry) {
				s.log.Warn("ignoring unexpected entry in function dir", "function", name, "entry", entry)
			}
			continue
		}
		fn.lastSeq = max(fn.lastSeq, seq)
		if fn.current == nil || seq > currentSeq {
			s.removeLogged(fnRoot, name, entry, "never became current")
			continue
		}
		fn.versions[entry] = &version{seq: seq}
	}
	return fn, nil
}

func newFunction() *function {
	return &function{deploying: make(chan struct{}, 1), versions: make(map[string]*version)}
}

func versionName(seq uint64, digest string) string {
	return fmt.Sprintf("%06d-%s", seq, digest[:digestPrefix])
}

// parseVersion reads the sequence number of a version directory's name.
func parseVersion(name string) (uint64, bool) {
	seqText, digest, ok := strings.Cut(name, "-")
	if !ok || len(digest) != digestPrefix {
		return 0, false
	}
	if _, err := hex.DecodeString(digest); err != nil {
		return 0, false
	}
	seq, err := strconv.ParseUint(seqText, 10, 64)
	if err != nil || len(seqText) < 6 {
		return 0, false
	}
	return seq, true
}

// digestOf identifies what a deploy installs: the archive and the handler
// (which decides one file's mode). Handlers never contain NUL.
func digestOf(handler string, archive []byte) string {
	h := sha256.New()
	h.Write([]byte(handler))
	h.Write([]byte{0})
	h.Write(archive)
	return hex.EncodeToString(h.Sum(nil))
}

// Deploy installs archive as the current version of function name, with
// handler made executable. Deploys of one function run one at a time, in
// parallel with other functions' deploys and with executions holding leases.
// On any error the previous version stays current and nothing of the new one
// remains on disk. The caller checks that the function is registered.
func (s *Store) Deploy(ctx context.Context, name, handler string, archive []byte) (Deployment, error) {
	if err := ValidName(name); err != nil {
		return Deployment{}, err
	}
	if err := ValidHandler(handler); err != nil {
		return Deployment{}, err
	}
	fn, err := s.beginDeploy(name)
	if err != nil {
		return Deployment{}, err
	}
	defer s.inflight.Done()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(s.closing, func() { cancel(ErrClosed) })()
	select {
	case fn.deploying <- struct{}{}:
		defer func() { <-fn.deploying }()
	case <-ctx.Done():
		return Deployment{}, fmt.Errorf("waiting for an earlier deploy of the function: %w", context.Cause(ctx))
	}

	digest := digestOf(handler, archive)
	s.mu.Lock()
	cur := fn.current
	s.mu.Unlock()
	if cur != nil && cur.Digest == digest {
		return Deployment{Version: cur.Version, Files: cur.Files, Bytes: cur.Bytes, Unchanged: true}, nil
	}

	start := time.Now()
	rec, err := s.install(ctx, name, fn, handler, digest, archive)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && errors.Is(err, ctx.Err()) {
			err = cause // ErrClosed rather than "context canceled" when Close stopped it
		}
		return Deployment{}, err // the caller names the function
	}
	s.log.Debug("installed version", "function", name, "version", rec.Version,
		"files", rec.Files, "bytes", rec.Bytes, "duration", time.Since(start))
	s.collect(name, fn)
	return Deployment{Version: rec.Version, Files: rec.Files, Bytes: rec.Bytes}, nil
}

// removeIfNeverDeployed takes away the function dir a failed first deploy
// made, so a refused deploy leaves nothing behind. The dir goes only if it
// is empty; the caller holds fn.deploying, so no other deploy is adding to
// it.
func (s *Store) removeIfNeverDeployed(name string, fn *function) {
	s.mu.Lock()
	never := fn.current == nil && len(fn.versions) == 0
	s.mu.Unlock()
	if !never {
		return
	}
	if err := s.root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Debug("function dir of a failed first deploy kept", "function", name, "err", err)
	}
}

// beginDeploy registers a deploy with Close and returns the function's state.
func (s *Store) beginDeploy(name string) (*function, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	s.inflight.Add(1)
	fn := s.functions[name]
	if fn == nil {
		fn = newFunction()
		s.functions[name] = fn
	}
	return fn, nil
}

// install checks, extracts and switches to a new version; the caller holds
// fn.deploying.
func (s *Store) install(ctx context.Context, name string, fn *function, handler, digest string, archive []byte) (_ *record, err error) {
	zr, err := zip.NewReader(bytes.NewReader(archive), int64(len(archive)))
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) { // names are checked below, with better messages
		return nil, fmt.Errorf("%w: cannot read it as a zip: %w", ErrBadArchive, err)
	}
	p, err := planArchive(zr, int64(len(archive)), handler, s.limits)
	if err != nil {
		return nil, err
	}
	fnRoot, err := s.functionRoot(name)
	if err != nil {
		return nil, err
	}
	defer fnRoot.Close()
	defer func() {
		if err != nil {
			s.removeIfNeverDeployed(name, fn)
		}
	}()

	s.mu.Lock()
	fn.lastSeq++
	ver := versionName(fn.lastSeq, digest)
	s.mu.Unlock()
	stage := stagePrefix + ver
	files, written, err := s.extract(ctx, fnRoot, stage, p, int64(len(archive)))
	if err != nil {
		s.removeLogged(fnRoot, name, stage, "failed deploy")
		return nil, err
	}
	if err := fnRoot.Rename(stage, ver); err != nil {
		s.removeLogged(fnRoot, name, stage, "failed deploy")
		return nil, fmt.Errorf("rename version: %w", err)
	}
	rec := &record{Version: ver, Digest: digest, Handler: handler, Files: files, Bytes: written}
	if err := writePointer(fnRoot, rec); err != nil {
		s.removeLogged(fnRoot, name, ver, "failed deploy")
		return nil, err
	}
	s.mu.Lock()
	fn.versions[ver] = &version{seq: fn.lastSeq}
	fn.current = rec
	s.mu.Unlock()
	return rec, nil
}

// functionRoot opens apps_dir/<name>, creating it; it refuses a symlink so
// no path on disk is ever followed.
func (s *Store) functionRoot(name string) (*os.Root, error) {
	err := s.root.Mkdir(name, 0o755)
	switch {
	case err == nil:
		if err := s.root.Chmod(name, 0o755); err != nil {
			return nil, fmt.Errorf("create function dir: %w", err)
		}
		if err := syncDir(s.root, "."); err != nil {
			return nil, fmt.Errorf("sync apps dir: %w", err)
		}
	case !errors.Is(err, fs.ErrExist):
		return nil, fmt.Errorf("create function dir: %w", err)
	}
	fi, err := s.root.Lstat(name)
	if err != nil {
		return nil, fmt.Errorf("function dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("function dir %q is a %v, not a directory", filepath.Join(s.dir, name), fi.Mode().Type())
	}
	return s.root.OpenRoot(name)
}

// extract writes plan p into the fresh directory stage and makes it durable.
func (s *Store) extract(ctx context.Context, fnRoot *os.Root, stage string, p *plan, archiveSize int64) (files int, written int64, err error) {
	if err := fnRoot.Mkdir(stage, 0o755); err != nil {
		return 0, 0, fmt.Errorf("create version dir: %w", err)
	}
	if err := fnRoot.Chmod(stage, 0o755); err != nil {
		return 0, 0, fmt.Errorf("create version dir: %w", err)
	}
	stageRoot, err := fnRoot.OpenRoot(stage)
	if err != nil {
		return 0, 0, fmt.Errorf("open version dir: %w", err)
	}
	defer stageRoot.Close()
	budget, over := s.limits.byteBudget(archiveSize)
	x := &extraction{root: stageRoot, plan: p, budget: budget, overLimit: over}
	if err := x.run(ctx); err != nil {
		return 0, 0, err
	}
	return len(p.files), x.written.Load(), nil
}

// writePointer makes rec current: written to a temporary file, made durable,
// then renamed over "current" in one atomic step.
func writePointer(fnRoot *os.Root, rec *record) error {
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := fnRoot.Remove(pointerTemp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("write current-version pointer: %w", err)
	}
	f, err := fnRoot.OpenFile(pointerTemp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("write current-version pointer: %w", err)
	}
	_, err = f.Write(append(raw, '\n'))
	if err == nil {
		err = f.Chmod(0o644) // past the umask, like everything else here
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fnRoot.Rename(pointerTemp, currentFile)
	}
	if err == nil {
		err = syncDir(fnRoot, ".")
	}
	if err != nil {
		fnRoot.Remove(pointerTemp)
		return fmt.Errorf("write current-version pointer: %w", err)
	}
	return nil
}

// collect removes the versions of fn that are not current, not among the
// newest s.keep superseded ones, and not leased. The caller keeps s.root
// open: it is in s.inflight, or Close has not begun.
func (s *Store) collect(name string, fn *function) {
	s.mu.Lock()
	var old []string
	for v := range fn.versions {
		if fn.current == nil || v != fn.current.Version {
			old = append(old, v)
		}
	}
	sort.Slice(old, func(i, j int) bool { return fn.versions[old[i]].seq > fn.versions[old[j]].seq })
	var doomed []string
	for i, v := range old {
		if i >= s.keep && fn.versions[v].leases == 0 {
			doomed = append(doomed, v)
			delete(fn.versions, v)
		}
	}
	s.mu.Unlock()
	if len(doomed) == 0 {
		return
	}
	fnRoot, err := s.root.OpenRoot(name)
	if err != nil {
		s.log.Warn("cannot remove old versions", "function", name, "err", err)
		return
	}
	defer fnRoot.Close()
	for _, v := range doomed {
		// Renamed first so a crash mid-removal leaves a name Open clears.
		trash := trashPrefix + v
		if err := fnRoot.Rename(v, trash); err != nil {
			s.log.Warn("cannot remove old version", "function", name, "version", v, "err", err)
			continue
		}
		s.removeLogged(fnRoot, name, trash, "superseded")
	}
}

func (s *Store) removeLogged(fnRoot *os.Root, function, entry, why string) {
	if err := fnRoot.RemoveAll(entry); err != nil {
		s.log.Warn("cannot remove a version directory", "function", function, "entry", entry, "why", why, "err", err)
	}
}

// Close stops new deploys and leases, stops the deploys under way (they
// fail with ErrClosed and leave nothing behind), waits for them, and
// releases apps_dir. Leases still held stay valid on disk.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.close()
	s.inflight.Wait()
	return s.root.Close()
}
