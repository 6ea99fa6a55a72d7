#!/bin/sh
# Creates the unprivileged user the sandbox runs functions as, the way the
# .deb does, so the sandbox's user tests run instead of skipping. Needs root.
set -eu
if ! getent passwd flux-runner >/dev/null; then
	useradd --system --user-group --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin flux-runner
fi
