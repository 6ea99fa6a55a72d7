package deployments

import (
	"archive/zip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

var (
	// ErrBadArchive is wrapped by every refusal of an archive's content:
	// corrupt or empty zips and entries that could not be installed safely.
	ErrBadArchive = errors.New("bad archive")
	// ErrTooLarge is wrapped when an archive exceeds the Store's Limits.
	ErrTooLarge = errors.New("archive exceeds limits")
)

// EntryError names the archive entry that made a deploy fail, so the
// caller's message points at the file to fix. Err is ErrBadArchive or
// ErrTooLarge (possibly wrapping a zip error).
type EntryError struct {
	// Entry is the name exactly as the archive spells it.
	Entry string
	// Reason says what is wrong with it.
	Reason string
	// Err is the sentinel (and any cause) for errors.Is.
	Err error
}

// Error says what was wrong with which entry.
func (e *EntryError) Error() string {
	return fmt.Sprintf("%v: entry %q: %s", e.Err, e.Entry, e.Reason)
}

// Unwrap lets errors.Is find ErrBadArchive or ErrTooLarge.
func (e *EntryError) Unwrap() error { return e.Err }

func badEntry(name, format string, args ...any) error {
	return &EntryError{Entry: name, Reason: fmt.Sprintf(format, args...), Err: ErrBadArchive}
}

// Limits bound what one archive may unpack to. A zero field takes its value
// from DefaultLimits, so the zero Limits is the default.
type Limits struct {
	// MaxBytes bounds the uncompressed bytes actually written, counted while
	// copying (headers can lie).
	MaxBytes int64
	// MaxFiles bounds the number of entries: files, directories and symlinks.
	MaxFiles int
	// MaxRatio bounds uncompressed bytes per byte of archive, against zip
	// bombs that fit MaxBytes but are absurd for their size.
	MaxRatio int
}

// Default limits: large enough for any real function, small enough that a
// hostile archive cannot fill the disk.
const (
	DefaultMaxBytes = 1 << 30
	DefaultMaxFiles = 20000
	DefaultMaxRatio = 200
)

// DefaultLimits returns the limits used for every zero field of Limits.
func DefaultLimits() Limits {
	return Limits{MaxBytes: DefaultMaxBytes, MaxFiles: DefaultMaxFiles, MaxRatio: DefaultMaxRatio}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxBytes <= 0 {
		l.MaxBytes = d.MaxBytes
	}
	if l.MaxFiles <= 0 {
		l.MaxFiles = d.MaxFiles
	}
	if l.MaxRatio <= 0 {
		l.MaxRatio = d.MaxRatio
	}
	return l
}

// byteBudget is the most bytes an archive of archiveSize may unpack to, and
// which limit sets it (for the error message).
func (l Limits) byteBudget(archiveSize int64) (int64, string) {
	if archiveSize <= l.MaxBytes/int64(l.MaxRatio) {
		return archiveSize * int64(l.MaxRatio), fmt.Sprintf("more than %d times the archive's %d bytes (compression ratio limit)", l.MaxRatio, archiveSize)
	}
	return l.MaxBytes, fmt.Sprintf("more than %d bytes (size limit)", l.MaxBytes)
}

type entryKind int

const (
	kindDir entryKind = iota
	kindFile
	kindSymlink
)

// entry is one archive member that passed every check, with the name it is
// installed under ('/'-separated, clean, relative).
type entry struct {
	name   string
	kind   entryKind
	file   *zip.File
	mode   fs.FileMode // permission bits for files: 0o644 or 0o755
	target string      // symlink target, '/'-separated
}

// plan is an archive checked as a whole, before any byte is written: every
// name, type, symlink and count is known to be safe, so extraction only has
// to copy (and count the real bytes).
type plan struct {
	steps   int // path elements walked by resolve, against maxResolveSteps
	byName  map[string]*entry
	entries []*entry // as the archive lists them, for deterministic errors
	dirs    []string // every directory, explicit or implied, parents first
	files   []*entry // in archive order
	links   []*entry
}

// maxLinkTarget bounds a symlink's target; the kernel's own limit is 4095.
const maxLinkTarget = 4095

// maxLinkHops mirrors the kernel's limit on symlinks followed in one lookup.
const maxLinkHops = 40

// maxEntryNameLen and maxElemLen keep every installed path well inside the
// kernel's PATH_MAX (4096) and NAME_MAX (255), whatever apps_dir is.
const (
	maxEntryNameLen = 2048
	// maxPathDepth bounds how deep a name may nest; real trees (even
	// node_modules) stay far below it.
	maxPathDepth = 64
	maxElemLen   = 255
)

// maxResolveSteps bounds the work of checking all symlinks of one archive
// (path elements walked), so a crafted web of links cannot stall a deploy.
// Real trees need a few per link.
const maxResolveSteps = 1 << 20

// planArchive checks every entry of zr, an archive of archiveSize bytes. It
// reads only symlink targets, so a refusal costs no disk and little time.
// Declared sizes are checked against the limits here, as an early refusal
// for honest headers; extraction counts the real bytes.
func planArchive(zr *zip.Reader, archiveSize int64, handler string, lim Limits) (*plan, error) {
	if len(zr.File) == 0 {
		return nil, fmt.Errorf("%w: the archive has no entries", ErrBadArchive)
	}
	if len(zr.File) > lim.MaxFiles {
		return nil, fmt.Errorf("%w: %d entries, at most %d allowed", ErrTooLarge, len(zr.File), lim.MaxFiles)
	}
	p := &plan{byName: make(map[string]*entry, len(zr.File))}
	budget, over := lim.byteBudget(archiveSize)
	var declared uint64
	for _, f := range zr.File {
		e, err := checkEntry(f)
		if err != nil {
			return nil, err
		}
		if e == nil {
			continue // the archive's own root directory
		}
		if prev, dup := p.byName[e.name]; dup {
			if prev.kind == kindDir && e.kind == kindDir {
				continue // "a/" twice says nothing new; harmless
			}
			return nil, badEntry(f.Name, "duplicate of an earlier entry for %q", e.name)
		}
		declared += f.UncompressedSize64
		if f.UncompressedSize64 > uint64(budget) || declared > uint64(budget) {
			return nil, &EntryError{Entry: f.Name, Reason: "declared sizes add up to " + over, Err: ErrTooLarge}
		}
		p.byName[e.name] = e
		p.entries = append(p.entries, e)
		switch e.kind {
		case kindFile:
			p.files = append(p.files, e)
		case kindSymlink:
			p.links = append(p.links, e)
		}
	}
	if err := p.addParents(lim.MaxFiles); err != nil {
		return nil, err
	}
	for _, l := range p.links {
		if err := p.readLink(l); err != nil {
			return nil, err
		}
	}
	for _, l := range p.links {
		if err := p.checkLink(l); err != nil {
			return nil, err
		}
	}
	if err := p.markHandler(handler); err != nil {
		return nil, err
	}
	return p, nil
}

// checkEntry refuses names and types that cannot be installed safely, and
// returns nil for an entry naming the archive root itself.
func checkEntry(f *zip.File) (*entry, error) {
	name := f.Name
	switch {
	case name == "":
		return nil, badEntry(name, "empty name")
	case strings.ContainsRune(name, 0):
		return nil, badEntry(name, "name contains a NUL byte")
	case strings.ContainsRune(name, '\\'):
		return nil, badEntry(name, "name contains a backslash")
	case strings.HasPrefix(name, "/") || filepath.VolumeName(name) != "":
		return nil, badEntry(name, "absolute path")
	case hasDotDot(strings.TrimSuffix(name, "/")):
		return nil, badEntry(name, "name contains a \"..\" element")
	case len(name) > maxEntryNameLen:
		return nil, badEntry(name, "name is %d bytes long, at most %d allowed", len(name), maxEntryNameLen)
	}
	depth := 0
	for elem := range strings.SplitSeq(name, "/") {
		if len(elem) > maxElemLen {
			return nil, badEntry(name, "a path element is %d bytes long, at most %d allowed", len(elem), maxElemLen)
		}
		if depth++; depth > maxPathDepth {
			return nil, badEntry(name, "more than %d path elements deep", maxPathDepth)
		}
	}
	mode := f.Mode()
	isDir := strings.HasSuffix(name, "/") || mode.IsDir()
	clean := path.Clean(strings.TrimSuffix(name, "/"))
	if clean == "." {
		if !isDir {
			return nil, badEntry(name, "a file cannot be the archive root")
		}
		return nil, nil
	}
	if !filepath.IsLocal(filepath.FromSlash(clean)) {
		return nil, badEntry(name, "not a local path on this system")
	}
	e := &entry{name: clean, file: f}
	switch {
	case isDir:
		e.kind = kindDir
	case mode.Type() == fs.ModeSymlink:
		e.kind = kindSymlink
	case mode.Type() == 0:
		e.kind = kindFile
		e.mode = 0o644
		if mode.Perm()&0o111 != 0 {
			e.mode = 0o755
		}
	default:
		return nil, badEntry(name, "%s entries are not allowed; only files, directories and symlinks", typeName(mode))
	}
	return e, nil
}

func typeName(m fs.FileMode) string {
	switch {
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "device"
	case m&fs.ModeNamedPipe != 0:
		return "FIFO"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return fmt.Sprintf("irregular (%v)", m.Type())
}

// addParents records every directory an entry implies and refuses an entry
// that would sit under a file or a symlink: writing through a symlink is how
// an archive reaches outside, and a file cannot hold children.
//
// Directories a name implies count against maxEntries like those listed:
// one entry "d/d/…/f" would otherwise create a thousand directories, and a
// small archive millions.
func (p *plan) addParents(maxEntries int) error {
	dirs := make(map[string]bool)
	for _, e := range p.entries {
		if e.kind == kindDir {
			dirs[e.name] = true
		}
		for dir := path.Dir(e.name); dir != "."; dir = path.Dir(dir) {
			if n := len(dirs) + len(p.files) + len(p.links); n > maxEntries {
				return &EntryError{Entry: e.file.Name, Err: ErrTooLarge,
					Reason: fmt.Sprintf("with the directories names imply, over %d entries, at most %d allowed", n-1, maxEntries)}
			}
			if parent, ok := p.byName[dir]; ok && parent.kind != kindDir {
				kind := "file"
				if parent.kind == kindSymlink {
					kind = "symlink"
				}
				return badEntry(e.file.Name, "its parent %q is a %s in the archive", dir, kind)
			}
			if dirs[dir] {
				break // its parents were added with it
			}
			dirs[dir] = true
		}
	}
	p.dirs = make([]string, 0, len(dirs))
	for d := range dirs {
		p.dirs = append(p.dirs, d)
	}
	sort.Strings(p.dirs) // "a" sorts before "a/b": parents first
	for _, d := range p.dirs {
		if _, ok := p.byName[d]; !ok {
			p.byName[d] = &entry{name: d, kind: kindDir}
		}
	}
	return nil
}

// readLink reads and statically checks a symlink's target.
func (p *plan) readLink(l *entry) error {
	rc, err := l.file.Open()
	if err != nil {
		return &EntryError{Entry: l.file.Name, Reason: "cannot read symlink target: " + err.Error(), Err: ErrBadArchive}
	}
	defer rc.Close()
	raw, err := io.ReadAll(io.LimitReader(rc, maxLinkTarget+1))
	if err != nil {
		return &EntryError{Entry: l.file.Name, Reason: "cannot read symlink target: " + err.Error(), Err: ErrBadArchive}
	}
	target := string(raw)
	switch {
	case len(raw) > maxLinkTarget:
		return badEntry(l.file.Name, "symlink target longer than %d bytes", maxLinkTarget)
	case target == "":
		return badEntry(l.file.Name, "symlink with an empty target")
	case strings.ContainsRune(target, 0):
		return badEntry(l.file.Name, "symlink target contains a NUL byte")
	case strings.ContainsRune(target, '\\'):
		return badEntry(l.file.Name, "symlink target %q contains a backslash", target)
	case strings.HasPrefix(target, "/") || filepath.IsAbs(target) || filepath.VolumeName(target) != "":
		return badEntry(l.file.Name, "symlink to absolute path %q; only relative links inside the archive are allowed", target)
	}
	l.target = target
	return nil
}

// checkLink refuses a symlink that could lead outside the version directory,
// judged two ways so that both Unix (which follows links component by
// component) and lexical path handling (as on Windows) stay inside: the
// target joined to the link's directory must not climb out, and following it
// through the archive's own symlinks must not climb out either.
func (p *plan) checkLink(l *entry) error {
	dir := path.Dir(l.name)
	if !filepath.IsLocal(filepath.FromSlash(path.Join(dir, l.target))) {
		return badEntry(l.file.Name, "symlink to %q points outside the archive", l.target)
	}
	hops := 0
	_, err := p.resolve(splitPath(dir), l.target, &hops)
	switch {
	case errors.Is(err, errEscapes):
		return badEntry(l.file.Name, "symlink to %q leads outside the archive through other symlinks", l.target)
	case errors.Is(err, errLoop):
		return badEntry(l.file.Name, "symlink to %q is part of a loop", l.target)
	case errors.Is(err, errTooComplex):
		return badEntry(l.file.Name, "symlinks too intricate to check (more than %d steps)", maxResolveSteps)
	}
	return nil // dangling links are allowed: nothing can ever appear at the target
}

var (
	errEscapes    = errors.New("path leads outside")
	errLoop       = errors.New("too many levels of symbolic links")
	errMissing    = errors.New("no such entry")
	errTooComplex = errors.New("symlinks too intricate to check")
)

// resolve follows rel from the directory at stack through the archive's
// entries as the kernel would, one component at a time, and returns where it
// ends.
func (p *plan) resolve(stack []string, rel string, hops *int) ([]string, error) {
	stack = append([]string(nil), stack...)
	elems := splitPath(rel)
	for _, elem := range elems {
		if p.steps++; p.steps > maxResolveSteps {
			return nil, errTooComplex
		}
		if !p.isDir(stack) {
			return nil, errMissing // a file has no children: ENOTDIR
		}
		if elem == ".." {
			if len(stack) == 0 {
				return nil, errEscapes
			}
			stack = stack[:len(stack)-1]
			continue
		}
		stack = append(stack, elem)
		e, ok := p.byName[strings.Join(stack, "/")]
		if !ok {
			return nil, errMissing
		}
		if e.kind == kindSymlink {
			if *hops++; *hops > maxLinkHops {
				return nil, errLoop
			}
			var err error
			if stack, err = p.resolve(stack[:len(stack)-1], e.target, hops); err != nil {
				return nil, err
			}
		}
	}
	// "f/" and "f/." name a directory, as the kernel reads them.
	if (strings.HasSuffix(rel, "/") || strings.HasSuffix(rel, "/.") || rel == ".") && !p.isDir(stack) {
		return nil, errMissing
	}
	return stack, nil
}

// isDir reports whether the resolved path stack is a directory (the root
// is). Stacks from resolve never end at a symlink.
func (p *plan) isDir(stack []string) bool {
	if len(stack) == 0 {
		return true
	}
	e := p.byName[strings.Join(stack, "/")]
	return e != nil && e.kind == kindDir
}

// splitPath splits a '/'-separated relative path, dropping empty and "."
// elements.
func splitPath(p string) []string {
	var elems []string
	for elem := range strings.SplitSeq(p, "/") {
		if elem != "" && elem != "." {
			elems = append(elems, elem)
		}
	}
	return elems
}

// markHandler makes the file the handler names (through symlinks) executable,
// and refuses an archive without it: such a deploy could never run.
func (p *plan) markHandler(handler string) error {
	hops := 0
	stack, err := p.resolve(nil, handler, &hops)
	switch {
	case errors.Is(err, errMissing):
		return fmt.Errorf("%w: handler %q is not in the archive", ErrBadArchive, handler)
	case err != nil:
		return fmt.Errorf("%w: handler %q: %w", ErrBadArchive, handler, err)
	}
	e := p.byName[strings.Join(stack, "/")]
	if e == nil || e.kind != kindFile {
		return fmt.Errorf("%w: handler %q is not a regular file in the archive", ErrBadArchive, handler)
	}
	e.mode = 0o755
	return nil
}
