//go:build linux

package deb

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"debug/buildinfo"
	"debug/elf"
	"debug/pe"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/serverless-fabric/flux-agent/e2e/internal/testredis"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
)

// What the package promises; the test and packaging/README.md say the same.
const (
	pkgName     = "flux-agent"
	runnerUser  = "flux-runner"
	binPath     = "/usr/local/bin/flux-agent"
	unitPath    = "/lib/systemd/system/flux-agent.service"
	configDir   = "/etc/flux-agent"
	stateDir    = "/var/lib/flux-agent"
	appsDir     = "/var/lib/flux-agent/apps"
	dropInDir   = "/etc/systemd/system/flux-agent.service.d"
	wantsLink   = "/etc/systemd/system/multi-user.target.wants/flux-agent.service"
	docDir      = "/usr/share/doc/flux-agent"
	exampleConf = "/etc/flux-agent/agent.yaml.example"
	// agentShutdownGrace is the agent's default shutdown_grace; the unit's
	// TimeoutStopSec must leave room for it and for the cleanup after it.
	agentShutdownGrace = 30 * time.Second
)

// release is what GoReleaser reports in dist/metadata.json and
// dist/artifacts.json.
type release struct {
	dist      string
	version   string
	commit    string
	artifacts []artifact
}

type artifact struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Goos   string `json:"goos"`
	Goarch string `json:"goarch"`
	Type   string `json:"type"`
}

func TestDebPackage(t *testing.T) {
	requireDebTest(t)
	requireRoot(t)
	requireCommands(t, "dpkg", "dpkg-deb", "dpkg-query", "lintian", "redis-server", "systemd-analyze", "getent")
	root := repoRoot(t)
	rel := buildRelease(t, root)
	debs := map[string]string{} // arch → path
	for _, a := range rel.artifacts {
		if a.Type == "Linux Package" {
			debs[a.Goarch] = a.Path
		}
	}
	if _, ok := debs[runtime.GOARCH]; !ok || len(debs) != 2 {
		t.Fatalf("want a .deb for amd64 and arm64, got %v", debs)
	}

	t.Run("checksums", func(t *testing.T) { checkChecksums(t, rel) })
	for arch, deb := range debs {
		t.Run("deb-"+arch, func(t *testing.T) { checkDeb(t, root, rel, arch, deb) })
	}
	t.Run("windows-zip", func(t *testing.T) { checkWindowsZip(t, root, rel) })
	t.Run("lintian", func(t *testing.T) { checkLintian(t, debs[runtime.GOARCH]) })
	if t.Failed() {
		t.FailNow()
	}

	deb := debs[runtime.GOARCH]
	// Flux writes agent.yaml and the TLS files into its SSH user's home,
	// e.g. /home/admin/flux-agent/; a temp dir stands in for it.
	bootstrapConfig := filepath.Join(t.TempDir(), "flux-agent", "agent.yaml")
	if err := os.MkdirAll(filepath.Dir(bootstrapConfig), 0o700); err != nil {
		t.Fatal(err)
	}
	restoreRunner := saveRunnerUser(t)
	t.Cleanup(restoreRunner)
	t.Cleanup(saveFiles(t, "/etc/subuid", "/etc/subgid"))
	purgeLeftover(t)
	t.Cleanup(func() { purgeLeftover(t) })

	steps := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"install", func(t *testing.T) { mustRun(t, "dpkg", "-i", deb); checkInstalled(t) }},
		{"unit", checkUnit},
		{"bootstrap", func(t *testing.T) { simulateBootstrap(t, bootstrapConfig) }},
		{"reinstall", func(t *testing.T) { checkReinstall(t, deb) }},
		{"systemd-calls", func(t *testing.T) { checkSystemdCalls(t, rel) }},
		{"run-agent", func(t *testing.T) { runInstalledAgent(t, rel) }},
		{"remove", checkRemove},
		{"purge", func(t *testing.T) { checkPurge(t, bootstrapConfig) }},
		{"systemd-vm", func(t *testing.T) { runSystemdVM(t, root, rel) }},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.fn) {
			t.Fatalf("step %q failed; later steps need it", s.name)
		}
	}
}

// buildRelease runs the snapshot build, or reads FLUX_AGENT_DIST.
func buildRelease(t *testing.T, root string) release {
	dist := os.Getenv("FLUX_AGENT_DIST")
	if dist == "" {
		dist = filepath.Join(root, "dist")
		start := time.Now()
		cmd := exec.Command("go", "tool", "-modfile=tools/go.mod", "goreleaser", "release", "--snapshot", "--clean")
		cmd.Dir = root
		if strings.TrimSpace(mustRunIn(t, root, "git", "remote")) == "" {
			// GoReleaser reads the remote's URL and, in a clone without
			// one, reports the commit as "none"; give it this repo.
			cmd.Env = append(os.Environ(), "GIT_CONFIG_COUNT=1",
				"GIT_CONFIG_KEY_0=remote.origin.url", "GIT_CONFIG_VALUE_0="+root)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("goreleaser: %v\n%s", err, out)
		}
		t.Logf("goreleaser snapshot built in %s", time.Since(start).Round(time.Second))
	}
	var meta struct {
		Version string `json:"version"`
		Commit  string `json:"commit"`
	}
	readJSON(t, filepath.Join(dist, "metadata.json"), &meta)
	rel := release{dist: dist, version: meta.Version, commit: meta.Commit}
	readJSON(t, filepath.Join(dist, "artifacts.json"), &rel.artifacts)
	for i, a := range rel.artifacts {
		// Paths are relative to where GoReleaser ran: the repo root.
		if !filepath.IsAbs(a.Path) {
			rel.artifacts[i].Path = filepath.Join(filepath.Dir(dist), a.Path)
		}
	}
	if rel.version == "" || rel.commit == "" {
		t.Fatalf("metadata.json has no version or commit: %+v", meta)
	}
	if os.Getenv("FLUX_AGENT_DIST") == "" {
		// A real commit of this repo, not GoReleaser's "none".
		if err := exec.Command("git", "-C", root, "cat-file", "-e", rel.commit+"^{commit}").Run(); err != nil {
			t.Fatalf("release commit %q is not a commit of this repo: %v", rel.commit, err)
		}
	}
	return rel
}

// debVersion is the Debian version nfpm makes of a semver: a pre-release
// sorts before its release, so "-" becomes "~".
func debVersion(v string) string {
	return strings.Replace(v, "-", "~", 1)
}

func checkChecksums(t *testing.T, rel release) {
	data, err := os.ReadFile(filepath.Join(rel.dist, "checksums.txt"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		sum, name, ok := strings.Cut(line, "  ")
		if !ok {
			t.Fatalf("checksums.txt: malformed line %q", line)
		}
		names = append(names, name)
		got := fileSHA256(t, filepath.Join(rel.dist, name))
		if got != sum {
			t.Errorf("%s: sha256 %s, checksums.txt says %s", name, got, sum)
		}
	}
	dv := debVersion(rel.version)
	want := []string{
		fmt.Sprintf("flux-agent_%s_amd64.deb", dv),
		fmt.Sprintf("flux-agent_%s_arm64.deb", dv),
		fmt.Sprintf("flux-agent_%s_windows_amd64.zip", rel.version),
	}
	slices.Sort(names)
	slices.Sort(want)
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("checksums.txt names (-want +got):\n%s", diff)
	}
}

func checkDeb(t *testing.T, root string, rel release, arch, deb string) {
	dv := debVersion(rel.version)
	if want := fmt.Sprintf("flux-agent_%s_%s.deb", dv, arch); filepath.Base(deb) != want {
		t.Errorf("file name %s, want %s", filepath.Base(deb), want)
	}

	fields := controlFields(mustRun(t, "dpkg-deb", "-f", deb))
	wantFields := map[string]string{
		"Package":      pkgName,
		"Version":      dv,
		"Architecture": arch,
		"Section":      "admin",
		"Priority":     "optional",
		"Depends":      "passwd",
		"Maintainer":   "Serverless Fabric <packages@serverless-fabric.dev>",
		"Homepage":     "https://github.com/serverless-fabric/flux-agent",
	}
	gotFields := map[string]string{}
	for k := range wantFields {
		gotFields[k] = fields[k]
	}
	if diff := cmp.Diff(wantFields, gotFields); diff != "" {
		t.Errorf("control fields (-want +got):\n%s", diff)
	}
	if !strings.Contains(fields["Description"], "\n") {
		t.Errorf("Description has no extended text: %q", fields["Description"])
	}

	// Every file with its mode and owner; directories the package owns too.
	wantEntries := map[string]string{
		"./etc/flux-agent/":                        "drwxr-x--- root/root",
		"./etc/flux-agent/agent.yaml.example":      "-rw-r--r-- root/root",
		"./lib/systemd/system/flux-agent.service":  "-rw-r--r-- root/root",
		"./usr/lib/modules-load.d/flux-agent.conf": "-rw-r--r-- root/root",
		"./usr/local/bin/flux-agent":               "-rwxr-xr-x root/root",
		"./usr/share/doc/flux-agent/README.md":     "-rw-r--r-- root/root",
		"./usr/share/doc/flux-agent/copyright":     "-rw-r--r-- root/root",
		"./usr/share/lintian/overrides/flux-agent": "-rw-r--r-- root/root",
	}
	gotEntries := map[string]string{}
	for _, e := range debEntries(t, mustRun(t, "dpkg-deb", "-c", deb)) {
		if strings.HasSuffix(e.path, "/") && e.path != "./etc/flux-agent/" {
			// Parent dirs: only their modes matter.
			if e.mode != "drwxr-xr-x" || e.owner != "root/root" {
				t.Errorf("dir %s is %s %s, want drwxr-xr-x root/root", e.path, e.mode, e.owner)
			}
			continue
		}
		gotEntries[e.path] = e.mode + " " + e.owner
	}
	if diff := cmp.Diff(wantEntries, gotEntries); diff != "" {
		t.Errorf("package contents (-want +got):\n%s", diff)
	}

	// Control area: the conffile and our maintainer scripts, executable.
	ctrl := t.TempDir()
	mustRun(t, "dpkg-deb", "-e", deb, ctrl)
	conffiles, err := os.ReadFile(filepath.Join(ctrl, "conffiles"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(exampleConf+"\n", string(conffiles)); diff != "" {
		t.Errorf("conffiles (-want +got):\n%s", diff)
	}
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		got, err := os.ReadFile(filepath.Join(ctrl, script))
		if err != nil {
			t.Errorf("%s: %v", script, err)
			continue
		}
		want, err := os.ReadFile(filepath.Join(root, "packaging", "deb", script))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s in the package differs from packaging/deb/%s", script, script)
		}
		if fi, err := os.Stat(filepath.Join(ctrl, script)); err != nil || fi.Mode().Perm() != 0o755 {
			t.Errorf("%s: mode %v (%v), want 0755", script, fi.Mode(), err)
		}
	}
	if _, err := os.Stat(filepath.Join(ctrl, "preinst")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unexpected preinst (%v)", err)
	}

	// The payload: the config and unit are ours, the binary is a static,
	// trimmed build for this arch carrying the release's version.
	data := t.TempDir()
	mustRun(t, "dpkg-deb", "-x", deb, data)
	for dst, src := range map[string]string{
		"etc/flux-agent/agent.yaml.example":     "example.agent.yaml",
		"lib/systemd/system/flux-agent.service": "packaging/flux-agent.service",
	} {
		if !bytes.Equal(readFile(t, filepath.Join(data, dst)), readFile(t, filepath.Join(root, src))) {
			t.Errorf("%s differs from %s", dst, src)
		}
	}
	bin := filepath.Join(data, "usr/local/bin/flux-agent")
	checkELF(t, bin, arch)
	checkBuildInfo(t, bin, "linux", arch, rel)
	if arch == runtime.GOARCH {
		got := strings.TrimSpace(mustRun(t, bin, "--version"))
		want := fmt.Sprintf("flux-agent %s (%s) linux/%s", rel.version, rel.commit, arch)
		if got != want {
			t.Errorf("--version: %q, want %q", got, want)
		}
	}
}

func checkELF(t *testing.T, path, arch string) {
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[arch]
	if f.Machine != want {
		t.Errorf("%s: machine %v, want %v", path, f.Machine, want)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s is dynamically linked (has PT_INTERP); want CGO_ENABLED=0", path)
		}
	}
}

func checkBuildInfo(t *testing.T, path, goos, arch string, rel release) {
	info, err := buildinfo.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	want := map[string]string{"GOOS": goos, "GOARCH": arch, "CGO_ENABLED": "0", "-trimpath": "true"}
	got := map[string]string{}
	for k := range want {
		got[k] = settings[k]
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s build settings (-want +got):\n%s", path, diff)
	}
	// With -trimpath the build info omits -ldflags; the -X values are in
	// the binary's data.
	data := readFile(t, path)
	for _, v := range []string{rel.version, rel.commit} {
		if !bytes.Contains(data, []byte(v)) {
			t.Errorf("%s does not contain %q: want it set by -X main.version/main.commit", path, v)
		}
	}
}

func checkWindowsZip(t *testing.T, root string, rel release) {
	var path string
	for _, a := range rel.artifacts {
		if a.Type == "Archive" && a.Goos == "windows" {
			path = a.Path
		}
	}
	if want := fmt.Sprintf("flux-agent_%s_windows_amd64.zip", rel.version); filepath.Base(path) != want {
		t.Fatalf("windows archive %q, want %s", path, want)
	}
	zr, err := zip.OpenReader(path)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	files := map[string][]byte{}
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		files[f.Name], err = io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	if diff := cmp.Diff([]string{"README.txt", "agent.yaml.example", "flux-agent.exe"}, names); diff != "" {
		t.Fatalf("zip contents (-want +got):\n%s", diff)
	}
	if !bytes.Equal(files["agent.yaml.example"], readFile(t, filepath.Join(root, "example.agent.yaml"))) {
		t.Error("agent.yaml.example differs from example.agent.yaml")
	}
	if !bytes.Equal(files["README.txt"], readFile(t, filepath.Join(root, "packaging/windows/README.txt"))) {
		t.Error("README.txt differs from packaging/windows/README.txt")
	}
	exe := bytes.NewReader(files["flux-agent.exe"])
	pf, err := pe.NewFile(exe)
	if err != nil {
		t.Fatalf("flux-agent.exe: %v", err)
	}
	if pf.Machine != pe.IMAGE_FILE_MACHINE_AMD64 {
		t.Errorf("flux-agent.exe machine %#x, want amd64", pf.Machine)
	}
	exePath := filepath.Join(t.TempDir(), "flux-agent.exe")
	if err := os.WriteFile(exePath, files["flux-agent.exe"], 0o644); err != nil {
		t.Fatal(err)
	}
	checkBuildInfo(t, exePath, "windows", "amd64", rel)
}

// checkLintian fails on any lintian error; warnings are listed in
// packaging/README.md with the reason each is accepted.
func checkLintian(t *testing.T, deb string) {
	out, err := exec.Command("lintian", "--fail-on", "error", "--display-info", deb).CombinedOutput()
	t.Logf("lintian %s:\n%s", filepath.Base(deb), out)
	if err != nil {
		t.Errorf("lintian: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "E: ") {
			t.Errorf("lintian error: %s", line)
		}
	}
}

func checkInstalled(t *testing.T) {
	status := mustRun(t, "dpkg-query", "-W", "-f=${Status}", pkgName)
	if status != "install ok installed" {
		t.Errorf("dpkg status %q", status)
	}
	u, err := user.Lookup(runnerUser)
	if err != nil {
		t.Fatalf("postinst did not create %s: %v", runnerUser, err)
	}
	passwd := strings.Split(strings.TrimSpace(mustRun(t, "getent", "passwd", runnerUser)), ":")
	uid, _ := strconv.Atoi(u.Uid)
	if uid == 0 || uid >= 1000 {
		t.Errorf("%s uid %d, want a system uid (1-999)", runnerUser, uid)
	}
	if diff := cmp.Diff([]string{"/nonexistent", "/usr/sbin/nologin"}, passwd[5:]); diff != "" {
		t.Errorf("%s home and shell (-want +got):\n%s", runnerUser, diff)
	}
	g, err := user.LookupGroup(runnerUser)
	if err != nil || g.Gid != u.Gid {
		t.Errorf("%s group: %v %v, want the user's primary group %s", runnerUser, g, err, u.Gid)
	}
	if groups, err := u.GroupIds(); err != nil || !slices.Equal(groups, []string{u.Gid}) {
		t.Errorf("%s groups %v (%v), want only its own", runnerUser, groups, err)
	}
	// The executions' uids are reserved as the runner's range, in both
	// files, once, whoever came first.
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		var lines []string
		for _, l := range strings.Split(string(readFile(t, f)), "\n") {
			if strings.HasPrefix(l, runnerUser+":") {
				lines = append(lines, l)
			}
		}
		if len(lines) != 1 {
			t.Errorf("%s holds %q for %s, want one range", f, lines, runnerUser)
		}
	}
	wantModes := map[string]string{
		binPath:     "-rwxr-xr-x 0:0",
		unitPath:    "-rw-r--r-- 0:0",
		configDir:   "drwxr-x--- 0:0",
		exampleConf: "-rw-r--r-- 0:0",
		stateDir:    "drwx--x--x 0:0",
		appsDir:     "drwxr-xr-x 0:0",
	}
	gotModes := map[string]string{}
	for p := range wantModes {
		gotModes[p] = modeOwner(t, p)
	}
	if diff := cmp.Diff(wantModes, gotModes); diff != "" {
		t.Errorf("installed modes (-want +got):\n%s", diff)
	}
}

// checkUnit reads the installed unit the way systemd would and checks what
// the agent relies on, then lets systemd-analyze verify it.
func checkUnit(t *testing.T) {
	unit := parseUnit(t, readFile(t, unitPath))
	want := map[string][]string{
		"Service.User":                   {"root"},
		"Service.ExecStart":              {binPath},
		"Service.Environment":            {"AGENT_CONFIG=/etc/flux-agent/agent.yaml"},
		"Service.Delegate":               {"yes"},
		"Service.OOMPolicy":              {"continue"},
		"Service.TasksMax":               {"infinity"},
		"Service.KillMode":               {"mixed"},
		"Service.KillSignal":             {"SIGTERM"},
		"Service.Restart":                {"on-failure"},
		"Service.NoNewPrivileges":        {"yes"},
		"Service.ProtectSystem":          {"strict"},
		"Service.StateDirectory":         {"flux-agent"},
		"Service.StateDirectoryMode":     {"0711"},
		"Service.PrivateTmp":             {"yes"},
		"Service.ProtectHome":            {"read-only"}, // Flux writes the config and keys under /home
		"Service.ProtectControlGroups":   nil,           // would make /sys/fs/cgroup read-only
		"Service.ProtectKernelTunables":  nil,           // so would this, with all of /sys
		"Service.RestrictNamespaces":     nil,           // clone3 → ENOSYS: no CLONE_INTO_CGROUP
		"Service.SystemCallFilter":       nil,           // functions inherit it
		"Service.MemoryDenyWriteExecute": nil,           // breaks JIT runtimes in functions
		"Service.UMask":                  nil,           // function code must stay readable
		"Service.PrivateUsers":           nil,           // setuid to flux-runner needs the real ids
		"Install.WantedBy":               {"multi-user.target"},
	}
	got := map[string][]string{}
	for k := range want {
		got[k] = unit[k]
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("unit settings (-want +got):\n%s", diff)
	}
	if stop := unit["Service.TimeoutStopSec"]; len(stop) != 1 {
		t.Errorf("TimeoutStopSec: %v", stop)
	} else if d, err := time.ParseDuration(stop[0]); err != nil || d < agentShutdownGrace+10*time.Second {
		t.Errorf("TimeoutStopSec=%s (%v): want at least shutdown_grace %s + 10s of cleanup", stop[0], err, agentShutdownGrace)
	}
	caps := strings.Fields(strings.Join(unit["Service.CapabilityBoundingSet"], " "))
	for _, c := range []string{"CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER",
		"CAP_SYS_ADMIN", "CAP_NET_ADMIN"} {
		if !slices.Contains(caps, c) {
			t.Errorf("CapabilityBoundingSet lacks %s, which the sandbox needs (functions' uids, mount namespaces, network policy)", c)
		}
	}
	if dir := unit["Service.RuntimeDirectory"]; !slices.Equal(dir, []string{"flux-agent"}) || !slices.Equal(unit["Service.RuntimeDirectoryMode"], []string{"0700"}) {
		t.Errorf("RuntimeDirectory %v mode %v, want flux-agent 0700 (the admin socket's dir)", dir, unit["Service.RuntimeDirectoryMode"])
	}

	out, err := exec.Command("systemd-analyze", "verify", unitPath).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	if out, err := exec.Command("systemd-analyze", "security", "--offline=yes", unitPath).CombinedOutput(); err == nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		t.Logf("systemd-analyze security: %s", lines[len(lines)-1])
	}
}

// simulateBootstrap does what Flux's SSH bootstrap does after dpkg -i,
// except starting the unit (no systemd here): a drop-in naming the config
// it wrote into the SSH user's home, and `systemctl enable`.
func simulateBootstrap(t *testing.T, bootstrapConfig string) {
	if err := os.MkdirAll(dropInDir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dropInDir, "flux.conf"), "[Service]\nEnvironment=AGENT_CONFIG="+bootstrapConfig+"\n", 0o644)
	// Enabling only writes symlinks; it works without a running systemd.
	if out, err := exec.Command("systemctl", "enable", pkgName).CombinedOutput(); err != nil {
		t.Fatalf("systemctl enable: %v\n%s", err, out)
	}
	if target, err := os.Readlink(wantsLink); err != nil || target != unitPath {
		t.Fatalf("enable symlink %s → %q (%v), want %s", wantsLink, target, err, unitPath)
	}
	env := unitEnvironment(t)
	if got, want := env["AGENT_CONFIG"], bootstrapConfig; got != want {
		t.Errorf("AGENT_CONFIG with the drop-in: %q, want %q (the drop-in must win)", got, want)
	}
}

// checkReinstall installs the same package again (dpkg runs prerm upgrade
// and postinst configure <version>): nothing the agent made may change.
func checkReinstall(t *testing.T, deb string) {
	marker := filepath.Join(appsDir, "marker")
	writeFile(t, marker, "kept", 0o644)
	before := mustRun(t, "getent", "passwd", runnerUser)
	mustRun(t, "dpkg", "-i", deb)
	if after := mustRun(t, "getent", "passwd", runnerUser); after != before {
		t.Errorf("reinstall changed %s: %q → %q", runnerUser, before, after)
	}
	if got := string(readFile(t, marker)); got != "kept" {
		t.Errorf("reinstall changed %s: %q", marker, got)
	}
	if _, err := os.Lstat(wantsLink); err != nil {
		t.Errorf("reinstall disabled the unit: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dropInDir, "flux.conf")); err != nil {
		t.Errorf("reinstall removed the drop-in: %v", err)
	}
	checkInstalled(t)
}

// checkSystemdCalls runs the installed maintainer scripts as if systemd
// were PID 1 (a private mount namespace where /run/systemd/system exists)
// with a systemctl that only records its arguments, and checks what each
// dpkg action would ask of systemd. Only actions that leave the installed
// package as it is are run.
func checkSystemdCalls(t *testing.T, rel release) {
	requireCommands(t, "unshare")
	bin := t.TempDir()
	calls := filepath.Join(t.TempDir(), "calls")
	writeFile(t, filepath.Join(bin, "systemctl"), "#!/bin/sh\necho \"$*\" >>\""+calls+"\"\n", 0o755)
	dv := debVersion(rel.version)
	cases := []struct {
		script string
		args   []string
		want   []string
	}{
		{"postinst", []string{"configure", ""}, []string{"daemon-reload"}},
		{"postinst", []string{"configure", dv}, []string{"daemon-reload", "try-restart flux-agent.service"}},
		{"prerm", []string{"upgrade", dv}, nil},
		{"prerm", []string{"remove"}, []string{"stop flux-agent.service", "disable flux-agent.service"}},
		{"postrm", []string{"remove"}, []string{"daemon-reload"}},
		{"postrm", []string{"upgrade", dv}, nil},
	}
	for _, c := range cases {
		os.Remove(calls)
		script := "/var/lib/dpkg/info/flux-agent." + c.script
		args := append([]string{"--mount", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"`, "sh", script}, c.args...)
		cmd := exec.Command("unshare", args...)
		cmd.Env = append(os.Environ(), "PATH="+bin+":/usr/sbin:/usr/bin:/sbin:/bin")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s %v: %v\n%s", c.script, c.args, err, out)
			continue
		}
		var got []string
		if data, err := os.ReadFile(calls); err == nil {
			got = strings.Split(strings.TrimSpace(string(data)), "\n")
		}
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("%s %v: systemctl calls (-want +got):\n%s", c.script, c.args, diff)
		}
	}
	// The recorded `disable` did not touch the real symlinks; the package
	// is still installed and configured.
	checkInstalled(t)

	// On a host whose /usr/local/bin held only the agent, dpkg -r removes
	// the dir (the package is its only owner); postrm puts it back. An empty
	// tmpfs on /usr/local stands in for such a host.
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs tmpfs /usr/local && sh /var/lib/dpkg/info/flux-agent.postrm remove && stat -c '%A %U:%G' /usr/local/bin`).CombinedOutput()
	if err != nil {
		t.Errorf("postrm remove with an empty /usr/local: %v\n%s", err, out)
	} else if got := strings.TrimSpace(string(out)); got != "drwxr-xr-x root:root" && got != "drwxrwsr-x root:staff" {
		t.Errorf("postrm remove left /usr/local/bin as %q, want it recreated as base-files makes it", got)
	}
}

// runInstalledAgent runs /usr/local/bin/flux-agent with the environment
// the unit gives it and a real Redis, checks its health over gRPC, then
// stops it the way systemd would (SIGTERM, then TimeoutStopSec).
func runInstalledAgent(t *testing.T, rel release) {
	redisAddr := testredis.Start(t).Addr
	port := testredis.FreePort(t)
	env := unitEnvironment(t)
	configPath := env["AGENT_CONFIG"]
	// A manual install's config too: purge must remove it with the dir.
	writeFile(t, configDir+"/agent.yaml", "port: 50052\n", 0o644) // only the dir's 0750 hides it
	writeFile(t, configPath, fmt.Sprintf(`agent_id: deb-e2e
listen_address: 127.0.0.1
port: %d
redis_addr: %s
network:
  node_private_ip: 127.0.0.1
  node_public_ip: 127.0.0.1
  public_ip_url: ""
telemetry:
  metrics_address: ""
`, port, redisAddr), 0o600)

	environ := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	check := exec.Command(binPath, "check-config")
	check.Env = environ
	if out, err := check.CombinedOutput(); err != nil {
		t.Fatalf("check-config: %v\n%s", err, out)
	} else if !strings.Contains(string(out), redisAddr) {
		t.Errorf("check-config does not show redis_addr %s:\n%s", redisAddr, out)
	}
	bad := exec.Command(binPath, "check-config")
	bad.Env = append(slices.Clone(environ), "FLUX_AGENT_LOG_LEVEL=loud")
	if out, err := bad.CombinedOutput(); err == nil || !strings.Contains(string(out), "log.level") {
		t.Errorf("check-config with a bad log level: %v, want a non-zero exit naming log.level:\n%s", err, out)
	}

	logPath := filepath.Join(t.TempDir(), "agent.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	agent := exec.Command(binPath)
	agent.Env = environ
	agent.Dir = "/"
	agent.Stdout, agent.Stderr = logFile, logFile
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- agent.Wait() }()
	stopped := false
	defer func() {
		if !stopped {
			agent.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", readFile(t, logPath))
		}
	}()

	conn, err := grpc.NewClient(net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.5, MaxDelay: 500 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// WaitForReady blocks until the agent listens (or the deadline passes).
	health, err := fluxpb.NewAgentServiceClient(conn).HealthCheck(ctx, &fluxpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("HealthCheck: %v", err)
	}
	if !health.GetHealthy() || health.GetVersion() != rel.version {
		t.Errorf("HealthCheck = healthy %v version %q, want true %q", health.GetHealthy(), health.GetVersion(), rel.version)
	}
	std, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || std.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("grpc.health.v1 Check: %v %v, want SERVING", std.GetStatus(), err)
	}

	// A function deployed into the installed layout runs as flux-runner,
	// can read its code under /var/lib/flux-agent/apps and cannot read the
	// agent's config.
	runFunction(t, conn, configDir+"/agent.yaml", configPath)

	// Stop as systemd does with KillMode=mixed: SIGTERM to the agent alone,
	// SIGKILL only after TimeoutStopSec.
	stopTimeout := unitDuration(t, "Service.TimeoutStopSec")
	if err := agent.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			t.Errorf("agent exit after SIGTERM: %v, want 0", err)
		}
	case <-time.After(stopTimeout):
		t.Errorf("agent still running %s after SIGTERM (TimeoutStopSec)", stopTimeout)
	}
}

// runFunction registers, deploys and runs a function through the
// installed agent the way Flux does, and checks who it ran as and what it
// could read.
func runFunction(t *testing.T, conn *grpc.ClientConn, configs ...string) {
	client := fluxpb.NewAgentServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ack, err := client.RegisterFunction(ctx, &fluxpb.FunctionConfig{
		Name: "whoami", Handler: "handler.sh", MemoryMb: 64, TimeoutSeconds: 10,
		MaxConcurrency: 5, MaxConcurrencyBehavior: "exit",
	})
	if err != nil || !ack.GetSuccess() {
		t.Fatalf("RegisterFunction: %v %v", ack, err)
	}
	script := "#!/bin/sh\nid -un\nid -u\ngrep -q marker-line \"$0\" && echo code-readable # marker-line\n"
	for _, c := range configs {
		script += fmt.Sprintf("cat %q >/dev/null 2>&1 && echo config-readable || echo config-hidden\n", c)
	}
	dack, err := client.DeployFunction(ctx, &fluxpb.DeploymentPackage{FunctionName: "whoami", CodeArchive: handlerZip(t, script)})
	if err != nil || !dack.GetSuccess() {
		t.Fatalf("DeployFunction: %v %v", dack, err)
	}
	resp, err := client.ExecuteFunction(ctx, &fluxpb.ExecutionRequest{FunctionName: "whoami", ExecutionId: "exc-" + uuid(t)})
	if err != nil || resp.GetError() != "" {
		t.Fatalf("ExecuteFunction: %v %q\n%s", err, resp.GetError(), resp.GetOutput())
	}
	// Each execution runs as a uid of its own from the range the package
	// reserved, named in the execution's own passwd.
	lines := strings.SplitN(string(resp.GetOutput()), "\n", 3)
	if len(lines) < 3 {
		t.Fatalf("function output %q", resp.GetOutput())
	}
	if uid, err := strconv.ParseUint(lines[1], 10, 32); err != nil || uid < 1879048192 || uid >= 1879048192+65536 {
		t.Errorf("function ran as uid %q, want one of the reserved range", lines[1])
	}
	want := "flux-fn\n" + lines[1] + "\ncode-readable\n" + strings.Repeat("config-hidden\n", len(configs))
	if diff := cmp.Diff(want, string(resp.GetOutput())); diff != "" {
		t.Errorf("function output (-want +got):\n%s", diff)
	}
}

func uuid(t *testing.T) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// runSystemdVM boots the package's VM test (e2e/deb/vm/run.sh): the same
// .deb under a real systemd on a cgroup v2 kernel, TestUnderSystemd inside.
func runSystemdVM(t *testing.T, root string, rel release) {
	if os.Getenv("FLUX_AGENT_DEB_VM") == "0" {
		t.Skip("FLUX_AGENT_DEB_VM=0")
	}
	start := time.Now()
	cmd := exec.Command("sh", filepath.Join(root, "e2e/deb/vm/run.sh"))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "FLUX_AGENT_DIST="+rel.dist)
	out, err := cmd.CombinedOutput()
	// The console log: the test's own lines, without the boot's noise.
	var report []string
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimRight(line, "\r")
		if strings.HasPrefix(line, "debvm:") || strings.HasPrefix(line, "    ") || strings.HasPrefix(line, "---") ||
			strings.HasPrefix(line, "===") || strings.HasPrefix(line, "DEBVM-RESULT") {
			report = append(report, line)
		}
	}
	t.Logf("VM (%s):\n%s", time.Since(start).Round(time.Second), strings.Join(report, "\n"))
	if err != nil {
		t.Errorf("e2e/deb/vm/run.sh: %v\n%s", err, out)
	}
}

// checkRemove: dpkg -r stops and disables the unit and removes the
// program, but keeps configuration, state and the runner user.
func checkRemove(t *testing.T) {
	mustRun(t, "dpkg", "-r", pkgName)
	for _, p := range []string{binPath, unitPath, wantsLink, docDir} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after dpkg -r (%v)", p, err)
		}
	}
	for _, p := range []string{configDir + "/agent.yaml", exampleConf, appsDir + "/marker", dropInDir} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("dpkg -r removed %s, which only purge may: %v", p, err)
		}
	}
	if _, err := user.Lookup(runnerUser); err != nil {
		t.Errorf("dpkg -r removed %s: %v", runnerUser, err)
	}
}

// checkPurge: nothing is left behind.
func checkPurge(t *testing.T, bootstrapConfig string) {
	mustRun(t, "dpkg", "--purge", pkgName)
	for _, p := range []string{binPath, unitPath, configDir, stateDir, dropInDir, wantsLink, docDir} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after purge (%v)", p, err)
		}
	}
	// What Flux wrote into its SSH user's home is Flux's, not the package's.
	if _, err := os.Stat(bootstrapConfig); err != nil {
		t.Errorf("purge removed %s, which Flux's bootstrap owns: %v", bootstrapConfig, err)
	}
	for _, db := range []string{"passwd", "group"} {
		if err := exec.Command("getent", db, runnerUser).Run(); err == nil {
			t.Errorf("%s still in %s after purge", runnerUser, db)
		}
	}
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		if strings.Contains(string(readFile(t, f)), runnerUser+":1879048192:65536") {
			t.Errorf("%s still reserves %s's range after purge", f, runnerUser)
		}
	}
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", pkgName).CombinedOutput(); err == nil && strings.TrimSpace(string(out)) != "" && !strings.Contains(string(out), "not-installed") {
		t.Errorf("dpkg still knows %s: %s", pkgName, out)
	}
	// The agent's default cgroup root on this cgroup v1 host: purge removes
	// it when empty. One holding processes or cgroups belongs to another
	// agent on this host (other tests) and is left alone.
	leftovers, _ := filepath.Glob("/sys/fs/cgroup/*/flux-agent")
	for _, dir := range leftovers {
		if cgroupEmpty(dir) {
			t.Errorf("empty cgroup %s left after purge", dir)
		}
	}
}

// cgroupEmpty says whether a cgroup v1 dir has no processes and no child
// cgroups.
func cgroupEmpty(dir string) bool {
	procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil || len(bytes.TrimSpace(procs)) > 0 {
		return false
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if e.IsDir() {
			return false
		}
	}
	return true
}

// purgeLeftover removes a flux-agent package a failed run left installed.
func purgeLeftover(t *testing.T) {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", pkgName).CombinedOutput()
	if err != nil || strings.Contains(string(out), "not-installed") {
		return
	}
	if out, err := exec.Command("dpkg", "--purge", pkgName).CombinedOutput(); err != nil {
		t.Errorf("purging a leftover %s: %v\n%s", pkgName, err, out)
	}
}

// saveFiles remembers files as they are before the test (the purge edits
// them) and returns what puts them back.
func saveFiles(t *testing.T, paths ...string) func() {
	saved := map[string][]byte{}
	for _, p := range paths {
		if data, err := os.ReadFile(p); err == nil {
			saved[p] = data
		}
	}
	return func() {
		for p, data := range saved {
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Errorf("restoring %s: %v", p, err)
			}
		}
	}
}

// saveRunnerUser remembers a flux-runner that existed before the test
// (other tests on this host may use one) and returns what puts it back.
func saveRunnerUser(t *testing.T) func() {
	u, err := user.Lookup(runnerUser)
	if err != nil {
		return func() {}
	}
	t.Logf("%s exists before the test (uid %s); purge will remove it and the test restores it", runnerUser, u.Uid)
	return func() {
		if _, err := user.Lookup(runnerUser); err == nil {
			return
		}
		if _, err := user.LookupGroupId(u.Gid); err != nil {
			if out, err := exec.Command("groupadd", "--system", "--gid", u.Gid, runnerUser).CombinedOutput(); err != nil {
				t.Errorf("restoring group %s: %v\n%s", runnerUser, err, out)
			}
		}
		if out, err := exec.Command("useradd", "--system", "--uid", u.Uid, "--gid", u.Gid, "--no-create-home",
			"--home-dir", u.HomeDir, "--shell", "/usr/sbin/nologin", runnerUser).CombinedOutput(); err != nil {
			t.Errorf("restoring user %s: %v\n%s", runnerUser, err, out)
		}
	}
}

// unitEnvironment is the environment systemd would give the agent: the
// unit's Environment= lines, then the drop-ins' in name order, last wins.
func unitEnvironment(t *testing.T) map[string]string {
	var values []string
	values = append(values, parseUnit(t, readFile(t, unitPath))["Service.Environment"]...)
	dropIns, _ := filepath.Glob(filepath.Join(dropInDir, "*.conf"))
	slices.Sort(dropIns)
	for _, p := range dropIns {
		values = append(values, parseUnit(t, readFile(t, p))["Service.Environment"]...)
	}
	env := map[string]string{}
	for _, v := range values {
		for _, assignment := range strings.Fields(v) {
			if k, val, ok := strings.Cut(strings.Trim(assignment, `"`), "="); ok {
				env[k] = val
			}
		}
	}
	return env
}

func unitDuration(t *testing.T, key string) time.Duration {
	v := parseUnit(t, readFile(t, unitPath))[key]
	if len(v) != 1 {
		t.Fatalf("%s: %v", key, v)
	}
	d, err := time.ParseDuration(v[0])
	if err != nil {
		t.Fatalf("%s=%s: %v", key, v[0], err)
	}
	return d
}

// parseUnit reads a systemd unit into "Section.Key" → values in order.
func parseUnit(t *testing.T, data []byte) map[string][]string {
	unit := map[string][]string{}
	section := ""
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("unit line %d: %q is not key=value in a section", n+1, line)
			}
			unit[section+"."+strings.TrimSpace(k)] = append(unit[section+"."+strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return unit
}

// controlFields parses `dpkg-deb -f` output; continuation lines join the
// field with "\n".
func controlFields(out string) map[string]string {
	fields := map[string]string{}
	last := ""
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if strings.HasPrefix(line, " ") && last != "" {
			fields[last] += "\n" + strings.TrimSpace(line)
			continue
		}
		k, v, _ := strings.Cut(line, ":")
		last = k
		fields[k] = strings.TrimSpace(v)
	}
	return fields
}

type debEntry struct{ mode, owner, path string }

// debEntries parses `dpkg-deb -c`: mode owner/group size date time path.
func debEntries(t *testing.T, out string) []debEntry {
	var entries []debEntry
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb -c: malformed line %q", line)
		}
		entries = append(entries, debEntry{mode: f[0], owner: f[1], path: f[5]})
	}
	return entries
}

func modeOwner(t *testing.T, path string) string {
	fi, err := os.Lstat(path)
	if err != nil {
		return "missing"
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("%s %d:%d", fi.Mode().String(), st.Uid, st.Gid)
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	return mustRunIn(t, "", name, args...)
}

func mustRunIn(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func fileSHA256(t *testing.T, path string) string {
	sum := sha256.Sum256(readFile(t, path))
	return hex.EncodeToString(sum[:])
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	if err := json.Unmarshal(readFile(t, path), v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func repoRoot(t *testing.T) string {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, ".goreleaser.yaml")); err != nil {
		t.Fatalf("repo root %s: %v", root, err)
	}
	return root
}

// requireDebTest keeps a host-changing test out of plain `go test ./...`.
func requireDebTest(t *testing.T) {
	if os.Getenv("FLUX_AGENT_DEB_TEST") != "1" {
		t.Skip("installs a package and a system user on this host: set FLUX_AGENT_DEB_TEST=1 to run")
	}
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("dpkg -i and running the agent as it runs in production need root")
	}
}

// requireCommands fails in CI (where .ci/run installs them) and skips
// elsewhere when a tool is missing.
func requireCommands(t *testing.T, names ...string) {
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s not installed (.ci/run installs it): %v", n, err)
			}
			t.Skipf("%s not installed: %v", n, err)
		}
	}
}

// handlerZip is a code archive holding one executable handler.sh.
func handlerZip(t *testing.T, script string) []byte {
	t.Helper()
	var archive bytes.Buffer
	zw := zip.NewWriter(&archive)
	h := &zip.FileHeader{Name: "handler.sh", Method: zip.Deflate}
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err == nil {
		_, err = io.WriteString(w, script)
	}
	if err == nil {
		err = zw.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	return archive.Bytes()
}
