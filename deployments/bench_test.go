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
	"time"
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

// BenchmarkDeployVsUnzip alternates a deploy and an `unzip -q` of the same
// archive in every iteration, so load from elsewhere on the machine hits both
// alike, and reports each one's seconds per op and their ratio (the issue's
// target: ratio ≤ 1.5).
func BenchmarkDeployVsUnzip(b *testing.B) {
	if _, err := exec.LookPath("unzip"); err != nil {
		b.Skip("unzip not installed")
	}
	archive := benchArchive(b)
	tmp := b.TempDir()
	zipPath := filepath.Join(tmp, "bench.zip")
	if err := os.WriteFile(zipPath, archive, 0o644); err != nil {
		b.Fatal(err)
	}
	var agent, unzip time.Duration
	for i := 0; b.Loop(); i++ {
		dest := filepath.Join(tmp, fmt.Sprint("unzip", i))
		start := time.Now()
		if out, err := exec.Command("unzip", "-q", zipPath, "-d", dest).CombinedOutput(); err != nil {
			b.Fatalf("unzip: %v: %s", err, out)
		}
		unzip += time.Since(start)

		apps := filepath.Join(tmp, fmt.Sprint("apps", i))
		store, err := Open(apps, Options{})
		if err != nil {
			b.Fatal(err)
		}
		start = time.Now()
		if _, err := store.Deploy(context.Background(), "bench", "main.sh", archive); err != nil {
			b.Fatal(err)
		}
		agent += time.Since(start)
		store.Close()
		os.RemoveAll(apps)
		os.RemoveAll(dest)
	}
	b.ReportMetric(agent.Seconds()/float64(b.N), "agent-s/op")
	b.ReportMetric(unzip.Seconds()/float64(b.N), "unzip-s/op")
	b.ReportMetric(agent.Seconds()/unzip.Seconds(), "agent/unzip")
}
