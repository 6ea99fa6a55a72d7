package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// writeStatus prints a status as aligned lines; over --addr (no admin)
// it has only what AgentService tells.
func writeStatus(w io.Writer, st *fluxpb.StatusResponse, admin bool, where string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	agent := fmt.Sprintf("%s: flux-agent %s", st.GetAgentId(), st.GetVersion())
	if st.GetCommit() != "" && st.GetCommit() != "none" {
		agent += " (" + st.GetCommit() + ")"
	}
	if st.GetPid() != 0 {
		agent += fmt.Sprintf(", pid %d", st.GetPid())
	}
	line("agent", "%s", agent)
	if st.GetHealthy() {
		line("health", "healthy")
	} else if st.GetUnhealthyReason() != "" {
		line("health", "unhealthy: %s", st.GetUnhealthyReason())
	} else {
		line("health", "unhealthy")
	}
	if admin {
		if st.GetDraining() {
			line("draining", "yes: new executions are refused (flux-agent undrain)")
		} else {
			line("draining", "no")
		}
		if st.GetRedisError() != "" {
			line("redis", "no answer: %s", st.GetRedisError())
		} else {
			line("redis", "answers in %.2f ms", float64(st.GetRedisRttUs())/1000)
		}
	}
	node := st.GetNode()
	limit := "unlimited"
	if node.GetMaxTasks() > 0 {
		limit = fmt.Sprint(node.GetMaxTasks())
	}
	if admin {
		line("executions", "%d running, %d queued (max_tasks %s, queue_limit %d)", st.GetRunning(), st.GetQueued(), limit, st.GetQueueLimit())
	} else {
		line("executions", "%d active (max_tasks %s)", node.GetActiveTasks(), limit)
	}
	line("node", "CPU %.1f%%, memory %.1f%% of %s, up %s", node.GetCpuPercent(), node.GetMemoryPercent(),
		formatBytes(int64(node.GetMemoryTotalMb())<<20), formatDuration(time.Duration(node.GetUptimeSeconds())*time.Second))
	if iso := st.GetIsolation(); iso != nil {
		parts := []string{"cgroup " + iso.GetCgroup(), "user " + iso.GetUser()}
		if iso.GetUidRange() != "" {
			parts = append(parts, "a uid each from "+iso.GetUidRange())
		}
		if iso.GetNamespaces() {
			parts = append(parts, "private /tmp and /proc")
		}
		parts = append(parts, "network "+iso.GetNetwork())
		line("isolation", "%s", strings.Join(parts, ", "))
		for _, d := range iso.GetDegraded() {
			line("degraded", "%s", d)
		}
	}
	if admin {
		grpcAddr := st.GetGrpcAddress()
		if st.GetTls() {
			grpcAddr += " (mTLS)"
		}
		metrics := st.GetMetricsAddress()
		if metrics == "" {
			metrics = "off"
		}
		line("listening", "gRPC %s, metrics %s, admin %s", grpcAddr, metrics, where)
	} else {
		line("reached", "%s (AgentService only: ps, functions, drain and undrain need the admin socket)", where)
	}
	tw.Flush()
}

// writeJSON prints v as one JSON document.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// formatBytes writes a size as people read it: 512 B, 1.5 KiB, 12.0 MiB.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	if n%div == 0 {
		return fmt.Sprintf("%d %ciB", n/div, "KMGTP"[exp])
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// formatDuration writes a duration to the precision people read: 850ms,
// 3.2s, 4m12s, 2h5m.
func formatDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
}

// isTerminal says whether w is a terminal (a character device).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
