package deployments

import (
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// benchArchive builds the benchmark case: about 50 MiB of archive
// in 2000 files over 40 directories, with content that compresses like
// code and assets do (roughly 2:1), one handler marked executable.
func benchArchive(tb testing.TB) []byte {
	tb.Helper()
	const (
		files    = 2000
		fileSize = 48 << 10
	)
	rng := rand.New(rand.NewPCG(1, 2))
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	body := make([]byte, fileSize)
	for i := range files {
		name := fmt.Sprintf("pkg%02d/file%04d.dat", i%40, i)
		mode := os.FileMode(0o644)
		if i == 0 {
			name, mode = "main.sh", 0o755
		}
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			tb.Fatal(err)
		}
		for j := range body {
			body[j] = "0123456789abcdef"[rng.IntN(16)] // half the entropy of a byte
		}
		if _, err := w.Write(body); err != nil {
			tb.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkDeploy compares a deploy (checks, extraction, fsync, switch) with
// `unzip -q` of the same archive into the same filesystem. The issue's
// target is agent ≤ 1.5 × unzip.
func BenchmarkDeploy(b *testing.B) {
	archive := benchArchive(b)
	b.Logf("archive: %d bytes", len(archive))
	b.Run("agent", func(b *testing.B) {
		tmp := b.TempDir()
		b.SetBytes(int64(len(archive)))
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			apps := filepath.Join(tmp, fmt.Sprint(i))
			store, err := Open(apps, Options{})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := store.Deploy(context.Background(), "bench", "main.sh", archive); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			store.Close()
			os.RemoveAll(apps)
			b.StartTimer()
		}
	})
	b.Run("unzip", func(b *testing.B) {
		if _, err := exec.LookPath("unzip"); err != nil {
			b.Skip("unzip not installed")
		}
		tmp := b.TempDir()
		zipPath := filepath.Join(tmp, "bench.zip")
		if err := os.WriteFile(zipPath, archive, 0o644); err != nil {
			b.Fatal(err)
		}
		b.SetBytes(int64(len(archive)))
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			dest := filepath.Join(tmp, fmt.Sprint(i))
			b.StartTimer()
			out, err := exec.Command("unzip", "-q", zipPath, "-d", dest).CombinedOutput()
			if err != nil {
				b.Fatalf("unzip: %v: %s", err, out)
			}
			b.StopTimer()
			os.RemoveAll(dest)
			b.StartTimer()
		}
	})
}
