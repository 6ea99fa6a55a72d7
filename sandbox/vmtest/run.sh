#!/bin/sh
# Runs the sandbox's tests on a real cgroup v2 kernel: Debian's cloud kernel
# booted under QEMU with an initramfs holding busybox and the sandbox's
# static test binary. CI hosts mount cgroups in hybrid mode (v1 for memory,
# cpu and pids), production hosts are v2 only; this is how the v2 path gets
# the same assertions. Exits non-zero when any test fails inside the VM, the
# VM does not report, or it times out.
#
# Needs root (apt-get, mknod) and network access to the Debian mirror the
# first time. The kernel and tools are installed from Debian packages, never
# committed; the kernel is kept in $VMTEST_CACHE between runs.
#
#   sudo sandbox/vmtest/run.sh            # from the repository root
#   VMTEST_RUN='TestCPU|TestOutOfMemory' sandbox/vmtest/run.sh
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${VMTEST_CACHE:-/var/cache/flux-agent-vmtest}
run=${VMTEST_RUN:-.}
count=${VMTEST_COUNT:-1}
timeout_s=${VMTEST_TIMEOUT:-900}

need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx cpio || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
if [ -n "$need" ]; then
	echo "vmtest: installing$need"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# The kernel: Debian's cloud kernel, cached.
. "$repo/scripts/lib/qemu.sh"
vmlinuz=$(cloud_kernel "$cache")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
root="$work/root"
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" \
	"$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/test"

(cd "$repo" && CGO_ENABLED=0 go test -c -o "$root/test/sandbox.test" ./sandbox)
cp -r "$repo/sandbox/testdata" "$root/test/testdata"

cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list-full); do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# root and the runner user, for os/user and the user tests.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
flux-runner:x:999:995:flux-runner:/nonexistent:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
flux-runner:x:995:
EOF

# /init: mount the basics and cgroup2, put the test in a cgroup the way
# systemd's Delegate=yes does for the agent's service (so the sandbox moves
# itself into a leaf as in production), run it, print one result line,
# power off.
cat >"$root/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/flux-agent.service
echo "vmtest: kernel \$(uname -r)"
cd /test
# The test process (not this init) goes into the service's cgroup.
FLUX_SANDBOX_TEST_REQUIRE=root,v2,runner sh -c 'echo \$\$ > /sys/fs/cgroup/flux-agent.service/cgroup.procs && exec ./sandbox.test -test.v -test.count='$count' -test.timeout=600s -test.run "\$0"' '$run'
echo "VMTEST-RESULT: \$?"
poweroff -f
EOF
chmod 755 "$root/init"
mknod -m 600 "$root/dev/console" c 5 1

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.cpio.gz"

echo "vmtest: booting $(basename "$vmlinuz")"
boot_and_check VMTEST "$work/console.log" "$timeout_s" \
	-m 1024 -smp 2 -kernel "$vmlinuz" -initrd "$work/initrd.cpio.gz" \
	-append "console=ttyS0 panic=-1 quiet"
