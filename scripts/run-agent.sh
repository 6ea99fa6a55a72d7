#!/usr/bin/env bash
# Sets up and runs a working flux-agent on a fresh Debian machine, for a
# trial without Flux: installs and starts redis-server on loopback, creates
# the flux-runner user functions run as, builds the agent and runs it in the
# foreground with ./agent.yaml (written from example.agent.yaml if missing).
# Needs root (apt-get, useradd, cgroups) and Go 1.26+. Ctrl-C stops the
# agent; redis-server keeps running as a system service.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
if [ "$(id -u)" -ne 0 ]; then
	echo "run as root: it installs redis-server and runs functions in cgroups as flux-runner" >&2
	exit 1
fi
if ! command -v redis-server >/dev/null; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
	systemctl start redis-server 2>/dev/null || redis-server --bind 127.0.0.1 --port 6379 --daemonize yes >/dev/null
fi
sandbox/vmtest/setup-runner.sh
mkdir -p /var/lib/flux-agent/apps && chmod 0711 /var/lib/flux-agent && chmod 0755 /var/lib/flux-agent/apps
go build -o flux-agent .
if [ ! -f agent.yaml ]; then
	# A trial config: local Redis, readable logs, and no public IP lookup
	# (set network.public_ip_url or node_public_ip to have one).
	sed -e 's/^redis_addr: .*/redis_addr: "redis:\/\/127.0.0.1:6379"/' -e 's/^  format: json/  format: text/' \
		-e 's/^  public_ip_url: .*/  public_ip_url: ""/' example.agent.yaml > agent.yaml
fi
AGENT_CONFIG=./agent.yaml ./flux-agent check-config >/dev/null
exec env AGENT_CONFIG=./agent.yaml ./flux-agent
