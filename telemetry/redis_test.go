package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// redisOnSocket runs a real redis-server listening on a unix socket only
// (no port to race for) until the test ends.
func redisOnSocket(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skipf("redis-server is needed (apt-get install redis-server): %v", err)
	}
	dir := t.TempDir()
	socket := filepath.Join(dir, "redis.sock")
	cmd := exec.Command(path, "--port", "0", "--unixsocket", socket, "--save", "", "--appendonly", "no", "--dir", dir)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	c := redis.NewClient(&redis.Options{Network: "unix", Addr: socket})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for c.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not answer within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return socket
}

// TestInstrumentRedisNamesCommandsAndKeysNeverValues runs commands that
// carry a secret against a real Redis and reads every span back: commands
// and keys are there, the secret in no attribute, name, status or event.
func TestInstrumentRedisNamesCommandsAndKeysNeverValues(t *testing.T) {
	socket := redisOnSocket(t)
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	rdb := redis.NewClient(&redis.Options{Network: "unix", Addr: socket})
	t.Cleanup(func() { rdb.Close() })
	if err := InstrumentRedis(rdb, tp); err != nil {
		t.Fatal(err)
	}

	const secret = "s3cr3t-value-7f3a"
	const functions, record, output = "flux:agent:{a1}:functions", "flux:agent:a1:exec:{e1}", "flux:agent:a1:exec:{e1}:output"
	ctx, parent := tp.Tracer("test").Start(context.Background(), "parent")
	if err := rdb.HSet(ctx, functions, "fn", `{"env":{"DB_PASSWORD":"`+secret+`"}}`).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.SetRange(ctx, output, 0, "output with "+secret)
		p.Expire(ctx, output, time.Hour)
		p.Set(ctx, record, secret, time.Hour)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := rdb.HGet(ctx, record, secret).Err(); err == nil {
		t.Fatal("HGET on a string key succeeded")
	}
	// An unknown command: Redis quotes its arguments in the error.
	if err := rdb.Do(ctx, "nosuchcommand", secret).Err(); err == nil {
		t.Fatal("unknown command succeeded")
	}
	parent.End()
	// No span in the context: no Redis span either.
	if err := rdb.Get(context.Background(), record).Err(); err != nil {
		t.Fatal(err)
	}

	got := spans.GetSpans()
	byName := map[string]tracetest.SpanStub{}
	for _, s := range got {
		byName[s.Name] = s
		if dump := fmt.Sprintf("%+v", s); strings.Contains(dump, secret) {
			t.Errorf("span %s holds the secret: %s", s.Name, dump)
		}
	}
	if _, ok := byName["get"]; ok {
		t.Errorf("a command issued outside any span made a span: %v", names(got))
	}
	want := map[string]map[string]string{
		"hset":                               {"flux.redis.key": functions, "db.operation.name": "hset", "db.system.name": "redis"},
		"redis.pipeline setrange expire set": {"flux.redis.keys": `["` + output + `","` + record + `"]`, "db.operation.batch.size": "3", "db.query.summary": "setrange expire set"},
		"hget":                               {"flux.redis.key": record, "error.type": "WRONGTYPE"},
		"nosuchcommand":                      {"error.type": "ERR"},
	}
	for name, attrs := range want {
		s, ok := byName[name]
		if !ok {
			t.Errorf("no %q span among %v", name, names(got))
			continue
		}
		have := map[string]string{}
		for _, a := range s.Attributes {
			have[string(a.Key)] = a.Value.Emit()
		}
		for k, v := range attrs {
			if have[k] != v {
				t.Errorf("span %s: %s = %q, want %q", name, k, have[k], v)
			}
		}
		if _, ok := have["flux.redis.key"]; name == "nosuchcommand" && ok {
			t.Errorf("span of an unknown command has a key: %v", have)
		}
	}
	if s := byName["hget"]; s.Status.Code != codes.Error || s.Status.Description != "WRONGTYPE" {
		t.Errorf("failed hget status = %v %q, want Error WRONGTYPE", s.Status.Code, s.Status.Description)
	}
}

func names(spans tracetest.SpanStubs) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return out
}

func TestRedisErrorKindNeverQuotes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{context.DeadlineExceeded, "timeout"},
		{fmt.Errorf("write: %w", context.Canceled), "canceled"},
		{redis.ErrPoolTimeout, "pool_timeout"},
		{redis.ErrClosed, "closed"},
		{errors.New("redis: can't parse \"secret reply\""), "other"},
	} {
		if got := redisErrorKind(tc.err); got != tc.want {
			t.Errorf("redisErrorKind(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// BenchmarkRedisPipeline measures what InstrumentRedis adds to the agent's
// commonest write (an output chunk: SETRANGE and EXPIRE in one pipeline)
// against a real Redis on a unix socket, inside a recording span:
//
//	go test -run '^$' -bench RedisPipeline ./telemetry/
func BenchmarkRedisPipeline(b *testing.B) {
	for _, instrumented := range []bool{false, true} {
		b.Run(map[bool]string{false: "bare", true: "instrumented"}[instrumented], func(b *testing.B) {
			socket := redisOnSocket(b)
			tp := sdktrace.NewTracerProvider()
			defer tp.Shutdown(context.Background())
			rdb := redis.NewClient(&redis.Options{Network: "unix", Addr: socket})
			defer rdb.Close()
			if instrumented {
				if err := InstrumentRedis(rdb, tp); err != nil {
					b.Fatal(err)
				}
			}
			ctx, span := tp.Tracer("bench").Start(context.Background(), "parent")
			defer span.End()
			chunk := strings.Repeat("x", 512)
			const key = "flux:agent:a1:exec:{e1}:output"
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
					p.SetRange(ctx, key, 0, chunk)
					p.Expire(ctx, key, time.Hour)
					return nil
				}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
