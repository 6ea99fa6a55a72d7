# Shared by the tests that boot a real kernel under QEMU (sandbox/vmtest,
# e2e/deb/vm): Debian's cloud kernel, fetched once and cached, and a boot
# whose verdict is a "<NAME>-RESULT: <status>" line on the serial console.
# Source it; it defines functions only.

# cloud_kernel CACHE: prints the path of the vmlinuz of the image package
# linux-image-cloud-amd64 points at, fetching it into CACHE the first time.
cloud_kernel() {
	cache=$1
	mkdir -p "$cache"
	pkg=$(_cloud_kernel_pkg)
	if [ -z "$pkg" ]; then
		apt-get update -qq
		pkg=$(_cloud_kernel_pkg)
	fi
	if [ -z "$pkg" ]; then
		echo "cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2
		return 1
	fi
	# shellcheck disable=SC2012 # Debian's own file names
	vmlinuz=$(ls "$cache/$pkg"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
	if [ -z "$vmlinuz" ]; then
		echo "fetching $pkg" >&2
		tmp=$(mktemp -d)
		(cd "$tmp" && apt-get download -qq "$pkg" && dpkg-deb -x "$pkg"_*.deb x) >&2
		mkdir -p "$cache/$pkg/boot" "$cache/$pkg/lib"
		mv "$tmp"/x/boot/vmlinuz-* "$cache/$pkg/boot/"
		mv "$tmp"/x/lib/modules "$cache/$pkg/lib/"
		rm -rf "$tmp"
		# shellcheck disable=SC2012
		vmlinuz=$(ls "$cache/$pkg"/boot/vmlinuz-* | head -n1)
	fi
	echo "$vmlinuz"
}

# cloud_kernel_modules CACHE: prints the lib/modules/VERSION dir of the
# kernel cloud_kernel fetched (fetching it again when only the vmlinuz of an
# older cache is there).
cloud_kernel_modules() {
	cache=$1
	vmlinuz=$(cloud_kernel "$cache") || return 1
	dir=$(dirname "$(dirname "$vmlinuz")")
	if [ ! -d "$dir/lib/modules" ]; then
		rm -rf "$dir"
		vmlinuz=$(cloud_kernel "$cache") || return 1
	fi
	# shellcheck disable=SC2012
	ls -d "$dir"/lib/modules/* | head -n1
}

_cloud_kernel_pkg() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# boot_and_check NAME LOG TIMEOUT QEMU-ARGS...: boots with software
# emulation (no usable KVM here), tees the console to LOG and succeeds only
# when the console's last "NAME-RESULT: n" line says 0. Poweroff and a
# kernel panic both exit QEMU with 0, so the line is the verdict.
boot_and_check() {
	name=$1 log=$2 timeout_s=$3
	shift 3
	lower=$(echo "$name" | tr 'A-Z' 'a-z')
	status=0
	timeout "$timeout_s" qemu-system-x86_64 -accel tcg -nographic -no-reboot "$@" </dev/null | tee "$log" || status=$?
	if [ "$status" -ne 0 ]; then
		echo "$lower: qemu failed or timed out (status $status)" >&2
		return 1
	fi
	result=$(tr -d '\r' <"$log" | sed -n "s/^$name-RESULT: \([0-9]*\)\$/\1/p" | tail -n1)
	if [ "$result" != "0" ]; then
		echo "$lower: FAIL (result '${result:-none}')" >&2
		return 1
	fi
	echo "$lower: PASS"
}
