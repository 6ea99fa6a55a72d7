package cli

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"

	"github.com/serverless-fabric/flux-agent/doctor"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// quietRedis keeps go-redis's own pool messages out of doctor's report:
// the redis_addr check says what failed.
type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

// runDoctor checks the host and the agent's config; it exits 1 when a
// check that blocks executions fails. A running agent, found on the admin
// socket, is asked for its pid and addresses: the ports it holds are not
// a conflict.
func runDoctor(ctx context.Context, inv *invocation) error {
	if len(inv.args) > 0 {
		return usageError("doctor takes no argument")
	}
	if inv.addr != "" {
		return usageError("doctor checks this host: run it on the agent's host, without --addr")
	}
	cfg, err := inv.env.Doctor()
	if err != nil {
		return fmt.Errorf("the agent's config: %w", err)
	}
	redis.SetLogger(quietRedis{})
	if c, err := inv.connectAdmin(ctx); err == nil {
		callCtx, cancel := unary(ctx)
		st, err := c.admin.Status(callCtx, &fluxpb.StatusRequest{})
		cancel()
		c.Close()
		if err == nil {
			cfg.Agent = &doctor.RunningAgent{Pid: int(st.GetPid()), GRPCAddress: st.GetGrpcAddress(), MetricsAddress: st.GetMetricsAddress(), AdminSocket: adminEndpoint(inv)}
		}
	}
	report := doctor.Run(ctx, cfg)
	if inv.json {
		type line struct {
			doctor.Check
			Status string `json:"status"`
		}
		lines := make([]line, len(report.Checks))
		for i, c := range report.Checks {
			lines[i] = line{c, c.Status.String()}
		}
		if err := writeJSON(inv.env.Stdout, lines); err != nil {
			return err
		}
	} else if _, err := report.WriteTo(inv.env.Stdout); err != nil {
		return err
	}
	if failed := report.Failed(); len(failed) > 0 {
		if !inv.json {
			fmt.Fprintf(inv.env.Stderr, "flux-agent doctor: %d check(s) failed: executions cannot run until they are fixed\n", len(failed))
		}
		return exitCode(1)
	}
	return nil
}
