package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/telemetry"
)

// secrets are three values a function's user would not want anywhere but in
// the function: an env value, an argument, and what it prints. The code
// archive holds the third, so finding it would also find the archive.
type secrets struct {
	env, arg, out string
}

func newSecrets(t testing.TB) secrets {
	r := randomHex(t, 8)
	return secrets{env: "s3cr3t-env-" + r, arg: "s3cr3t-arg-" + r, out: "s3cr3t-out-" + r}
}

func (s secrets) all() []string { return []string{s.env, s.arg, s.out} }

// findSecrets returns the secrets that text holds.
func (s secrets) in(text string) []string {
	var found []string
	for _, v := range s.all() {
		if strings.Contains(text, v) {
			found = append(found, v)
		}
	}
	return found
}

// secretFlow registers a function with a secret env value, deploys code that
// prints its env, its argument and a secret of its own, and runs it sync and
// async with a secret argument. Every call carries traceID. The secrets go
// through the agent, Redis and back: the outputs are checked to hold them.
func secretFlow(t *testing.T, c fluxpb.AgentServiceClient, s secrets, traceID string) (syncID, asyncID string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+traceID+"-"+randomHex(t, 8)+"-01")

	ack, err := c.RegisterFunction(ctx, &fluxpb.FunctionConfig{
		Name: "vault", Handler: "handler.sh", MaxConcurrency: 5, MaxConcurrencyBehavior: "exit",
		Env: map[string]string{"DB_PASSWORD": s.env, "PLAIN": "not-secret"},
	})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("register: %v %v", err, ack)
	}
	script := fmt.Sprintf("#!/bin/sh\necho \"env=$DB_PASSWORD arg=$1\"\necho own=%s\n", s.out)
	dack, err := c.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: "vault", CodeArchive: zipOf(t, map[string]string{"handler.sh": script})})
	if err != nil || !dack.GetSuccess() {
		t.Fatalf("deploy: %v %v", err, dack)
	}
	want := fmt.Sprintf("env=%s arg=%s\nown=%s\n", s.env, s.arg, s.out)

	syncID = newID()
	resp, err := c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "vault", ExecutionId: syncID, Args: []string{s.arg}})
	if err != nil || resp.GetError() != "" || string(resp.GetOutput()) != want {
		t.Fatalf("sync execution: %v %q, output %q, want %q", err, resp.GetError(), resp.GetOutput(), want)
	}
	asyncID = newID()
	resp, err = c.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "vault", ExecutionId: asyncID, Args: []string{s.arg}, Async: true})
	if err != nil || resp.GetError() != "" {
		t.Fatalf("async execution: %v %q", err, resp.GetError())
	}
	if rec := waitRecord(t, c, asyncID, 30*time.Second, "final status", isFinal); rec.Status != "success" || rec.Output != want {
		t.Fatalf("async record %s %q, want success %q", rec.Status, rec.Output, want)
	}
	return syncID, asyncID
}

// TestNoSecretInTraces runs the secret flow on an agent exporting to a real
// Jaeger, on one Redis and on a Redis Cluster, and reads back every span
// Jaeger holds for the agent: none holds a secret, while the Redis spans
// still name their commands and keys.
func TestNoSecretInTraces(t *testing.T) {
	j := startJaeger(t)
	for _, topology := range []string{"single", "cluster"} {
		t.Run(topology, func(t *testing.T) {
			agentID := "e2e-secrets-" + topology
			var redisYAML string
			var rs *redisServer
			if topology == "cluster" {
				addrs := startRedisCluster(t)
				rs = &redisServer{Addr: addrs[0]}
				redisYAML = fmt.Sprintf("redis_addr: %q\n", strings.Join(addrs, ","))
			} else {
				rs = startRedis(t)
			}
			a := startAgent(t, rs, agentOptions{AgentID: agentID, YAML: redisYAML + telemetryYAML(j.OTLPGRPCAddr, false), Env: fastExport})
			c := a.client(t)
			s := newSecrets(t)
			traceID := randomHex(t, 16)
			syncID, asyncID := secretFlow(t, c, s, traceID)

			// Wait for the last spans: both executions and the async one's
			// final pipeline (exported when the execution span ends).
			var spans []jaegerSpan
			complete := func() bool {
				traces := j.traces(t, traceID)
				if len(traces) == 0 {
					return false
				}
				spans = traces[0].Spans
				executions := 0
				for _, sp := range spans {
					if sp.OperationName == telemetry.SpanExecution {
						executions++
					}
				}
				return executions == 2 && slices.ContainsFunc(spans, func(sp jaegerSpan) bool {
					return strings.HasPrefix(sp.OperationName, "redis.pipeline") && strings.Contains(sp.OperationName, "srem")
				})
			}
			if !waitUntil(30*time.Second, complete) {
				t.Fatalf("trace %s incomplete in Jaeger after 30s: %s", traceID, describeTraces([]jaegerTrace{{TraceID: traceID, Spans: spans}}))
			}

			// The whole trace as Jaeger serves it, and every trace of the
			// agent's service (spans outside the caller's trace too).
			_, trace := httpGet(t, j.QueryURL+"/api/traces/"+traceID)
			q := url.Values{"service": {telemetry.ServiceName}, "limit": {"5000"}, "lookback": {"1h"}}
			code, all := httpGet(t, j.QueryURL+"/api/traces?"+q.Encode())
			if code != http.StatusOK {
				t.Fatalf("Jaeger trace search: %d %s", code, all)
			}
			if !strings.Contains(all, traceID) {
				t.Fatalf("Jaeger's search for %s does not return trace %s", telemetry.ServiceName, traceID)
			}
			for name, body := range map[string]string{"the trace": trace, "the service's traces": all} {
				if found := s.in(body); len(found) > 0 {
					t.Errorf("%s in Jaeger holds %v", name, found)
				}
			}
			t.Logf("%d spans in trace %s, %d bytes of trace JSON and %d of all the service's traces: no secret",
				len(spans), traceID, len(trace), len(all))

			checkRedisSpans(t, spans, agentID, syncID, asyncID)
		})
	}
}

// checkRedisSpans asserts the trace names the Redis commands and keys the
// flow used, so a trace that lost its Redis spans cannot pass as clean.
func checkRedisSpans(t *testing.T, spans []jaegerSpan, agentID, syncID, asyncID string) {
	t.Helper()
	keyOf := func(sp jaegerSpan) string {
		if v, ok := tagValue(sp.Tags, string(telemetry.AttrRedisKey)); ok {
			return v
		}
		v, _ := tagValue(sp.Tags, string(telemetry.AttrRedisKeys))
		return v
	}
	var redisSpans []string
	for _, sp := range spans {
		if isRedisSpan(sp) {
			redisSpans = append(redisSpans, sp.OperationName+"\t"+keyOf(sp))
		}
	}
	// On a Cluster a pipeline is split by node, so the commands are looked
	// for by word, not by the whole span name.
	want := []struct{ command, key string }{
		{"hset", "flux:agent:{" + agentID + "}:functions"},
		{"set", "flux:agent:" + agentID + ":exec:{" + syncID + "}"},
		{"sadd", "flux:agent:{" + agentID + "}:running"},
		{"setrange", "flux:agent:" + agentID + ":exec:{" + asyncID + "}:output"},
	}
	for _, w := range want {
		if !slices.ContainsFunc(redisSpans, func(s string) bool {
			name, keys, _ := strings.Cut(s, "\t")
			return slices.Contains(strings.Fields(name), w.command) && strings.Contains(keys, w.key)
		}) {
			t.Errorf("no Redis span of %q with key %s among:\n%s", w.command, w.key, strings.Join(redisSpans, "\n"))
		}
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("Redis spans:\n%s", strings.Join(redisSpans, "\n"))
	}
}

// TestNoSecretInDebugLogs runs the secret flow on an agent logging at debug
// and scans every line it wrote, through its shutdown.
func TestNoSecretInDebugLogs(t *testing.T) {
	rs := startRedis(t)
	a := startAgent(t, rs, agentOptions{YAML: "log:\n  level: debug\n"})
	c := a.client(t)
	s := newSecrets(t)
	syncID, asyncID := secretFlow(t, c, s, randomHex(t, 16))
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}

	lines := strings.Split(strings.TrimSpace(a.logs.String()), "\n")
	debug, about := 0, map[string]int{}
	for i, line := range lines {
		if found := s.in(line); len(found) > 0 {
			t.Errorf("log line %d holds %v: %s", i+1, found, line)
		}
		var fields map[string]any
		if json.Unmarshal([]byte(line), &fields) != nil {
			t.Errorf("log line %d is not JSON: %s", i+1, line)
			continue
		}
		if fields["level"] == "DEBUG" {
			debug++
		}
		if id, _ := fields[telemetry.LogExecutionID].(string); id == syncID || id == asyncID {
			about[id]++
		}
	}
	// The scan must have had something to scan: debug lines, and lines
	// about both executions.
	if debug == 0 || about[syncID] == 0 || about[asyncID] == 0 {
		t.Errorf("%d log lines, %d at debug, %d about the sync and %d about the async execution: the log is not the one expected",
			len(lines), debug, about[syncID], about[asyncID])
	}
	t.Logf("%d log lines (%d at debug) scanned: no secret", len(lines), debug)
}
