#!/usr/bin/env bash
# Sets up and runs every test of flux-agent on a fresh Debian machine (as
# root: the sandbox, package and cgroup tests need it; as another user they
# skip with a reason). This is what CI runs (.ci/run).
#
# It installs what the tests need from Debian's packages, builds the pinned
# tools (Jaeger, GoReleaser) through the Go build cache, and runs:
#   1. gofmt, go vet, the Windows build;
#   2. go test -race ./... (unit tests and e2e against real redis-server
#      processes each test starts and stops itself, real TLS, real Jaeger);
#   3. a short fuzz run of the zip extractor;
#   4. the sandbox tests on a real cgroup v2 kernel under QEMU;
#   5. the .deb: build with GoReleaser, install, run, purge.
# Nothing is left running: every server a test starts is stopped by it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "packages"
need=()
# ip, nsenter, ps, getent: the hostile-tenant tests build network
# namespaces (stand-ins for other hosts) and look at the node as a tenant.
for pkg_cmd in redis-server:redis-server redis-cli:redis-tools unzip:unzip lintian:lintian dpkg-deb:dpkg-dev \
	systemd-analyze:systemd ip:iproute2 nsenter:util-linux ipcmk:util-linux ps:procps getent:libc-bin; do
	command -v "${pkg_cmd%%:*}" >/dev/null || need+=("${pkg_cmd#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing: ${need[*]} (run as root, or apt-get install them)" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
go version | grep -Eq 'go1\.(2[6-9]|[3-9][0-9])' || { echo "Go 1.26 or newer is needed (found: $(go version))" >&2; exit 1; }

step "format, vet, Windows build"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$bad" ] || { echo "gofmt would change: $bad" >&2; exit 1; }
go vet ./...
GOOS=windows GOARCH=amd64 go vet ./...
GOOS=windows GOARCH=amd64 go build -o /dev/null .

step "tools (Jaeger for the trace test; cached by the Go build cache)"
tools_bin="${XDG_CACHE_HOME:-$HOME/.cache}/flux-agent-tools"
mkdir -p "$tools_bin"
go -C tools build -o "$tools_bin/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
export FLUX_E2E_JAEGER="$tools_bin/jaeger"

if [ "$(id -u)" -eq 0 ]; then
	# As root nothing may skip: the sandbox and hostile-tenant tests fail
	# instead of skipping when cgroups, the runner user or nf_tables in a
	# network namespace are missing.
	sandbox/vmtest/setup-runner.sh
	mode=v2
	[ -d /sys/fs/cgroup/memory ] && mode=v1
	export FLUX_SANDBOX_TEST_REQUIRE="root,$mode,runner,nftables"
fi

step "go test -race ./..."
go test -race -count=1 -timeout 30m ./...

step "fuzz the zip extractor"
go test -run '^$' -fuzz '^FuzzExtract$' -fuzztime 20s ./deployments/

if [ "$(id -u)" -eq 0 ]; then
	step "sandbox on a cgroup v2 kernel (QEMU)"
	sandbox/vmtest/run.sh

	step "the .deb: build, install, run, purge"
	FLUX_AGENT_DEB_TEST=1 go test -count=1 -timeout 30m ./e2e/deb/
else
	echo "skipping the cgroup v2 VM test and the .deb install test: they need root"
fi
step "all tests passed"
