package sandbox

import (
	"context"
	"os/exec"
	"testing"
)

// BenchmarkNoopExecution is the cost of one execution of /bin/true from
// Start to Done, per containment, against a plain fork/exec.
func BenchmarkNoopExecution(b *testing.B) {
	b.Run("plain-exec", func(b *testing.B) {
		for b.Loop() {
			if err := exec.Command("/bin/true").Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"process-group", Config{noCgroups: true}},
		{"cgroup", Config{}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s, err := New(testConfig(b, tc.cfg))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if tc.name == "cgroup" && s.Isolation().Cgroup == "none" {
				b.Skip("no writable cgroup")
			}
			for b.Loop() {
				p, err := s.Start(context.Background(), Spec{ID: "bench", Path: "/bin/true", Dir: "/"})
				if err != nil {
					b.Fatal(err)
				}
				<-p.Done()
				if r := p.Result(); r.ExitCode != 0 {
					b.Fatalf("exit %d", r.ExitCode)
				}
			}
		})
	}
}
