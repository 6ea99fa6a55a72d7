package deployments

import (
	"archive/zip"
	"bytes"
	"io/fs"
	"testing"
)

// member is one entry of an archive built by a test. Mode zero means a
// regular 0o644 file (or a 0o755 directory when Name ends in '/').
type member struct {
	Name string
	Body string
	Mode fs.FileMode
}

func file(name, body string) member { return member{Name: name, Body: body} }
func exe(name, body string) member  { return member{Name: name, Body: body, Mode: 0o755} }
func dir(name string) member        { return member{Name: name, Mode: fs.ModeDir | 0o755} }
func symlink(name, target string) member {
	return member{Name: name, Body: target, Mode: fs.ModeSymlink | 0o777}
}
func special(name string, m fs.FileMode) member { return member{Name: name, Mode: m | 0o644} }

// zipOf builds an archive holding members exactly as given: archive/zip's
// writer checks no names, so it can write every hostile case.
func zipOf(tb testing.TB, members ...member) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, m := range members {
		h := &zip.FileHeader{Name: m.Name, Method: zip.Deflate}
		mode := m.Mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			tb.Fatalf("zip %q: %v", m.Name, err)
		}
		if _, err := w.Write([]byte(m.Body)); err != nil {
			tb.Fatalf("zip %q: %v", m.Name, err)
		}
	}
	if err := zw.Close(); err != nil {
		tb.Fatalf("zip: %v", err)
	}
	return buf.Bytes()
}

func mustZipReader(tb testing.TB, archive []byte) *zip.Reader {
	tb.Helper()
	zr, err := zip.NewReader(bytes.NewReader(archive), int64(len(archive)))
	if err != nil {
		tb.Fatal(err)
	}
	return zr
}
