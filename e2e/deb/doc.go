// Package deb proves the release as operators get it: it builds the
// GoReleaser snapshot, checks the .deb and the Windows zip, installs the
// .deb on this machine, runs the installed agent against a real Redis, and
// purges it again. The test changes the host (a package, a system user), so
// it runs only when FLUX_AGENT_DEB_TEST=1 and as root:
//
//	FLUX_AGENT_DEB_TEST=1 go test -count=1 -timeout 30m -v ./e2e/deb/
//
// FLUX_AGENT_DIST=dir reuses an existing dist/ instead of building one.
package deb
