#!/bin/sh
# Creates the unprivileged user the sandbox runs functions as, and reserves
# the uids its executions run as (its range in /etc/subuid and
# /etc/subgid), the way the .deb does, so the sandbox's user tests and a
# default agent run instead of skipping or refusing to start. Needs root.
set -eu
RUNNER=flux-runner
# 65536 uids from 0x70000000: see sandbox.DefaultUIDRange for why there.
FIRST=1879048192
LAST=1879113727
if ! getent passwd "$RUNNER" >/dev/null; then
	useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin "$RUNNER"
fi
for f in /etc/subuid /etc/subgid; do
	[ -e "$f" ] || : >"$f"
	if ! grep -q "^$RUNNER:" "$f"; then
		echo "$RUNNER:$FIRST:$((LAST - FIRST + 1))" >>"$f"
	fi
done
