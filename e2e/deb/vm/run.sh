#!/bin/sh
# The ls globs here match Debian's own file names: plain ls is fine.
# shellcheck disable=SC2012
# Proves the .deb under a real systemd: boots Debian 12 (systemd as PID 1,
# cgroup v2) under QEMU with the root file system as its initramfs, and
# runs e2e/deb's TestUnderSystemd there. That test installs the package,
# does what Flux's bootstrap does, runs functions through the unit with all
# its hardening, stops, crashes and purges it. This host has no systemd as
# PID 1 and mounts cgroups v1, so this is the only place the unit runs.
#
# Needs root and, the first time, Debian's package mirror (the root file
# system comes from mmdebstrap and is cached; the kernel is Debian's cloud
# kernel, shared with sandbox/vmtest). Exits non-zero when the test fails
# inside the VM, the VM does not report, or it times out.
#
#   sudo e2e/deb/vm/run.sh                 # builds the snapshot first
#   FLUX_AGENT_DIST=dist e2e/deb/vm/run.sh # uses an existing dist/
set -eu

repo=$(cd "$(dirname "$0")/../../.." && pwd)
kernel_cache=${VMTEST_CACHE:-/var/cache/flux-agent-vmtest}
cache=${DEBVM_CACHE:-/var/cache/flux-agent-debvm}
timeout_s=${DEBVM_TIMEOUT:-900}
suite=bookworm
packages=systemd-sysv,redis-server,passwd,procps,kmod

need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v mmdebstrap >/dev/null || need="$need mmdebstrap"
command -v cpio >/dev/null || need="$need cpio"
command -v depmod >/dev/null || need="$need kmod"
if [ -n "$need" ]; then
	echo "debvm: installing$need"
	apt-get update -qq
	# $need is a list of package names: split on purpose.
	# shellcheck disable=SC2086
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# The kernel: Debian's cloud kernel, cached (shared with sandbox/vmtest).
mkdir -p "$cache"
. "$repo/scripts/lib/qemu.sh"
vmlinuz=$(cloud_kernel "$kernel_cache")

# The root file system, cached by what it holds.
rootfs_tar="$cache/rootfs-$suite-$(echo "$packages" | tr ',' '_').tar"
if [ ! -s "$rootfs_tar" ]; then
	echo "debvm: building the $suite root file system"
	mmdebstrap --quiet --variant=minbase --include="$packages" "$suite" "$cache/partial.tar"
	mv "$cache/partial.tar" "$rootfs_tar"
fi

# The package under test.
dist=${FLUX_AGENT_DIST:-}
if [ -z "$dist" ]; then
	(cd "$repo" && go tool -modfile=tools/go.mod goreleaser release --snapshot --clean >/dev/null)
	dist="$repo/dist"
fi
deb=$(ls "$dist"/flux-agent_*_amd64.deb | head -n1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
root="$work/root"
mkdir -p "$root"
tar -C "$root" -xf "$rootfs_tar"
# The kernel's netfilter modules (the agent's network policy needs
# nf_tables; Debian builds it as modules), with their index.
modules=$(cloud_kernel_modules "$kernel_cache")
kver=$(basename "$modules")
for sub in kernel/net/netfilter kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter kernel/lib; do
	if [ -d "$modules/$sub" ]; then
		mkdir -p "$root/lib/modules/$kver/$(dirname "$sub")"
		cp -r "$modules/$sub" "$root/lib/modules/$kver/$sub"
	fi
done
cp "$modules"/modules.builtin* "$modules"/modules.order "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"
mkdir -p "$root/debvm"
cp "$deb" "$root/debvm/flux-agent.deb"
(cd "$repo" && CGO_ENABLED=0 go test -c -o "$root/debvm/deb.test" ./e2e/deb)
# The start-path benchmark, run by the test against the installed agent.
(cd "$repo" && CGO_ENABLED=0 go test -c -o "$root/debvm/e2e.test" ./e2e)

# The test runs once the system is up and powers the VM off; its exit code
# goes to the console as one line the host reads.
cat >"$root/etc/systemd/system/debvm.service" <<EOF
[Unit]
Description=flux-agent package test under systemd
After=redis-server.service
[Service]
Type=oneshot
Environment=FLUX_AGENT_VM_TEST=1 FLUX_AGENT_DEB=/debvm/flux-agent.deb
ExecStart=/bin/sh -c 'cd /debvm && ./deb.test -test.run TestUnderSystemd -test.v -test.timeout 10m >/dev/ttyS0 2>&1; echo "DEBVM-RESULT: \$?" >/dev/ttyS0; systemctl poweroff --force --force'
[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/debvm.service "$root/etc/systemd/system/multi-user.target.wants/debvm.service"
# No login prompts on the console.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$root/etc/systemd/system/getty@tty1.service"
echo debvm >"$root/etc/hostname"
: >"$root/etc/machine-id"
[ -e "$root/dev/console" ] || mknod -m 600 "$root/dev/console" c 5 1

# Uncompressed: the kernel unpacks it without a slow decompression in TCG.
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initrd.cpio"
rm -rf "$root"

echo "debvm: booting $(basename "$vmlinuz") with $(du -h "$work/initrd.cpio" | cut -f1) of root file system"
boot_and_check DEBVM "$work/console.log" "$timeout_s" -nic none \
	-m 2048 -smp 2 -kernel "$vmlinuz" -initrd "$work/initrd.cpio" \
	-append "console=ttyS0 rdinit=/lib/systemd/systemd systemd.unified_cgroup_hierarchy=1 panic=-1 quiet"
