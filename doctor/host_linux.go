package doctor

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

// privateTmpDirs are what each function sees as an empty tmpfs of its
// own: code under them is invisible to it.
var privateTmpDirs = []string{"/tmp", "/var/tmp", "/dev/shm"}

// checkAppsDir walks apps_dir's path as a function will: every directory
// on it must let the runner's group (functions run with it, and no other
// group) or everyone through. One that does not makes every execution
// fail with "permission denied".
func (c *checker) checkAppsDir() {
	const key = "apps_dir"
	dir := filepath.Clean(c.cfg.AppsDir)
	if !filepath.IsAbs(dir) {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%q is not an absolute path", c.cfg.AppsDir), Fix: "set apps_dir to an absolute path (default /var/lib/flux-agent/apps)"})
		return
	}
	resolved, err := resolvePath(dir)
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s: %v", dir, err), Fix: "make apps_dir's path readable by root"})
		return
	}
	if c.root {
		for _, tmp := range privateTmpDirs {
			if resolved == tmp || strings.HasPrefix(resolved, tmp+"/") {
				c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s is under %s, which every function sees as an empty tmpfs of its own: no handler would be found", resolved, tmp),
					Fix: "move apps_dir out of /tmp, /var/tmp and /dev/shm (default /var/lib/flux-agent/apps)"})
				return
			}
		}
	}
	r := c.runner
	if r == nil {
		if c.root {
			return // the runner's failure says it all
		}
		c.add(Check{Name: key, Status: OK, Detail: resolved + " (functions run as this user: not checked for the runner)"})
		return
	}
	who := fmt.Sprintf("the runner's group (%s, gid %d)", r.name, r.gid)
	if r.uids.Count == 0 {
		who = fmt.Sprintf("%s (uid %d, gid %d)", r.name, r.uid, r.gid)
	}
	// Every ancestor; apps_dir itself the store opens up.
	for p := filepath.Dir(resolved); ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err == nil && !canEnter(&st, r) {
			c.add(Check{Name: key, Status: Fail,
				Detail: fmt.Sprintf("%s cannot enter %s (%s %s:%s), so every execution would fail with permission denied", who, p, fs.FileMode(st.Mode&0o777)|fs.ModeDir, owner(st.Uid), group(st.Gid)),
				Fix:    fmt.Sprintf("chmod o+x %s (enter only, not list), or move apps_dir under a directory others may enter (default /var/lib/flux-agent/apps)", p)})
			return
		}
		if p == "/" {
			break
		}
	}
	c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("%s: every directory on the way lets %s through", resolved, who)})
}

// resolvePath resolves the symlinks of the part of p that exists (the
// store makes the rest), following a dangling one by hand.
func resolvePath(p string) (string, error) {
	for range 40 { // as many links as the kernel follows
		existing := p
		for {
			_, err := os.Lstat(existing)
			if err == nil {
				break
			}
			if !errors.Is(err, fs.ErrNotExist) {
				return "", err
			}
			existing = filepath.Dir(existing)
		}
		rest := strings.TrimPrefix(p, existing)
		resolved, err := filepath.EvalSymlinks(existing)
		if err == nil {
			return filepath.Join(resolved, rest), nil
		}
		target, lerr := os.Readlink(existing)
		if lerr != nil {
			return "", err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(existing), target)
		}
		p = filepath.Join(target, rest)
	}
	return "", errors.New("too many levels of symbolic links")
}

// canEnter applies the kernel's rule: the owner's bits for the owner,
// else the group's for the group, else the others'. Functions run with
// the runner's gid and no supplementary group; with a uid range their uid
// owns nothing.
func canEnter(st *unix.Stat_t, r *runner) bool {
	switch {
	case r.uids.Count == 0 && st.Uid == r.uid:
		return st.Mode&0o100 != 0
	case st.Gid == r.gid:
		return st.Mode&0o010 != 0
	}
	return st.Mode&0o001 != 0
}

func owner(uid uint32) string {
	if u, err := lookupID(uid, "user"); err == nil {
		return u
	}
	return strconv.FormatUint(uint64(uid), 10)
}

func group(gid uint32) string {
	if g, err := lookupID(gid, "group"); err == nil {
		return g
	}
	return strconv.FormatUint(uint64(gid), 10)
}

// lookupID names a uid or gid from /etc/passwd or /etc/group.
func lookupID(id uint32, kind string) (string, error) {
	file := "/etc/passwd"
	if kind == "group" {
		file = "/etc/group"
	}
	f, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	want := strconv.FormatUint(uint64(id), 10)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.Split(sc.Text(), ":")
		if len(parts) > 2 && parts[2] == want {
			return parts[0], nil
		}
	}
	return "", fs.ErrNotExist
}

// capNetAdmin is CAP_NET_ADMIN's bit in /proc/<pid>/status's CapEff.
const capNetAdmin = 12

// checkNetwork checks that the configured network policy can be enforced:
// filtered needs the runner's uid range, nf_tables and CAP_NET_ADMIN in the
// agent (the running one's, when there is one).
func (c *checker) checkNetwork() {
	const key = "sandbox.network"
	hostFix := "or set sandbox.network: host (which leaves the node, its ports and Redis open to functions)"
	switch c.cfg.Network {
	case sandbox.NetworkHost:
		c.add(Check{Name: key, Status: Warn, Detail: "host: functions reach everything the node reaches, the agent's ports and Redis included",
			Fix: "set sandbox.network: filtered"})
		return
	case sandbox.NetworkNone:
		if !c.root {
			c.add(Check{Name: key, Status: Fail, Detail: "none needs root (a network namespace per slot)", Fix: "run the agent as root, " + hostFix})
			return
		}
		c.add(Check{Name: key, Status: OK, Detail: "none: each function reaches only its own loopback"})
		return
	}
	if !c.root || c.runner == nil || c.runner.uids.Count == 0 {
		c.add(Check{Name: key, Status: Fail, Detail: "filtered matches the functions' uids: it needs root, a runner user and a uid range (not shared)",
			Fix: "fix what the lines above say, " + hostFix})
		return
	}
	pid, whose := "self", "doctor"
	if c.cfg.Agent != nil {
		pid, whose = strconv.Itoa(c.cfg.Agent.Pid), "the running agent"
	}
	caps, err := effectiveCaps(filepath.Join(c.cfg.ProcDir, pid, "status"))
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("capabilities of %s: %v", whose, err), Fix: "run doctor as root"})
		return
	}
	if caps&(1<<capNetAdmin) == 0 {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("filtered needs CAP_NET_ADMIN to install its nftables table, and %s lacks it", whose),
			Fix: "give the agent CAP_NET_ADMIN (the unit's CapabilityBoundingSet, a container's --cap-add), " + hostFix})
		return
	}
	conn, err := nftables.New()
	if err == nil {
		_, err = conn.ListTables()
		conn.CloseLasting()
	}
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("filtered needs nf_tables, which does not answer: %v", err),
			Fix: "load it (modprobe nf_tables; the kernel needs CONFIG_NF_TABLES), " + hostFix})
		return
	}
	c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("filtered: nf_tables answers and the agent has CAP_NET_ADMIN, for uids %s", c.runner.uids)})
}

// effectiveCaps reads CapEff from a /proc/<pid>/status.
func effectiveCaps(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseCapEff(f)
}

func parseCapEff(r io.Reader) (uint64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff line")
}

// cgroupLayout is what /proc/self/mountinfo says of the cgroup mounts.
type cgroupLayout struct {
	v2       string            // the cgroup2 mount point, if any
	v1       map[string]string // v1 controller → mount point
	v2Opts   map[string]string // the cgroup2 mount's super options
	v2Unused bool              // the cgroup2 mount has no controllers (hybrid)
}

func (c *checker) layout() (cgroupLayout, error) {
	pfs, err := procfs.NewFS(c.cfg.ProcDir)
	if err != nil {
		return cgroupLayout{}, err
	}
	mounts, err := pfs.GetMounts()
	if err != nil {
		return cgroupLayout{}, err
	}
	return layoutOf(mounts), nil
}

func layoutOf(mounts []*procfs.MountInfo) cgroupLayout {
	l := cgroupLayout{v1: map[string]string{}}
	for _, m := range mounts {
		switch m.FSType {
		case "cgroup2":
			if l.v2 == "" || m.MountPoint == "/sys/fs/cgroup" {
				l.v2, l.v2Opts = m.MountPoint, m.SuperOptions
			}
		case "cgroup":
			for opt := range m.SuperOptions {
				l.v1[opt] = m.MountPoint
			}
		}
	}
	return l
}

// v1Needed are the v1 controllers the sandbox needs (cpuacct is optional).
var v1Needed = []string{"memory", "cpu", "pids", "freezer"}

// v2Needed are the v2 controllers the sandbox enables for its children.
var v2Needed = []string{"memory", "cpu", "pids"}

// checkCgroups says which cgroup mode the host has and whether the agent
// can create and limit cgroups where it will: without them functions run
// without memory, CPU and pids limits (the sandbox degrades, it does not
// fail).
func (c *checker) checkCgroups() {
	const key = "cgroups"
	degraded := "functions would run without memory, CPU and pids limits, and a kill reaches only their process group"
	l, err := c.layout()
	if err != nil {
		c.add(Check{Name: key, Status: Warn, Detail: "mounts: " + err.Error(), Fix: "run doctor where /proc is mounted"})
		return
	}
	if len(l.v1) > 0 && l.v1["memory"] != "" {
		c.checkCgroupsV1(l, degraded)
		return
	}
	if l.v2 == "" {
		c.add(Check{Name: key, Status: Warn, Detail: "no cgroup hierarchy is mounted: " + degraded, Fix: "mount cgroup2 at /sys/fs/cgroup (systemd does)"})
		return
	}
	c.checkCgroupsV2(l, degraded)
}

func (c *checker) checkCgroupsV1(l cgroupLayout, degraded string) {
	mode := "v1"
	if l.v2 != "" {
		mode = "hybrid (v1 controllers; the cgroup2 mount at " + l.v2 + " has none)"
	}
	root := c.cfg.CgroupRoot
	if root == "" {
		root = "/flux-agent"
	}
	c.add(Check{Name: "cgroups", Status: OK, Detail: mode + ", executions under " + root + " in each hierarchy"})
	for _, ctrl := range v1Needed {
		ck := Check{Name: "cgroup " + ctrl}
		mount := l.v1[ctrl]
		if mount == "" {
			ck.Status, ck.Detail = Warn, "the v1 "+ctrl+" hierarchy is not mounted: "+degraded
			ck.Fix = "mount it (mount -t cgroup -o " + ctrl + " cgroup /sys/fs/cgroup/" + ctrl + "), or boot with cgroup v2"
			c.add(ck)
			continue
		}
		dir := filepath.Join(mount, root)
		ck.Detail, ck.Status, ck.Fix = writable(dir, c.root, degraded)
		c.add(ck)
	}
}

func (c *checker) checkCgroupsV2(l cgroupLayout, degraded string) {
	base := c.cfg.CgroupRoot
	where := "sandbox.cgroup_root"
	if base == "" && c.cfg.Agent != nil {
		if own, err := v2CgroupOf(filepath.Join(c.cfg.ProcDir, strconv.Itoa(c.cfg.Agent.Pid), "cgroup")); err == nil {
			// The agent moved itself into a leaf "agent" of its cgroup.
			base, where = strings.TrimSuffix(own, "/agent"), "the running agent's cgroup"
		}
	}
	if base == "" {
		c.add(Check{Name: "cgroups", Status: OK, Detail: "v2 at " + l.v2 + "; the agent uses its own cgroup (the unit's, with Delegate=yes): start it and run doctor again to check that one"})
		base, where = "/", "the root"
	} else {
		c.add(Check{Name: "cgroups", Status: OK, Detail: fmt.Sprintf("v2 at %s, executions under %s (%s)", l.v2, base, where)})
	}
	dir := filepath.Join(l.v2, base)
	available, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		c.add(Check{Name: "cgroup delegation", Status: Warn, Detail: fmt.Sprintf("%s: %v: %s", where, err, degraded), Fix: "run the agent from its unit (Delegate=yes) or set sandbox.cgroup_root to a cgroup it owns"})
		return
	}
	have := strings.Fields(string(available))
	detail, status, fix := writable(filepath.Join(dir, "cgroup.subtree_control"), c.root, degraded)
	c.add(Check{Name: "cgroup delegation", Status: status, Detail: detail, Fix: fix})
	for _, ctrl := range v2Needed {
		if slices.Contains(have, ctrl) {
			c.add(Check{Name: "cgroup " + ctrl, Detail: "available in " + dir})
			continue
		}
		c.add(Check{Name: "cgroup " + ctrl, Status: Warn, Detail: fmt.Sprintf("not available in %s: %s", dir, degraded),
			Fix: "delegate it: Delegate=yes in the unit (or enable it in the parent's cgroup.subtree_control)"})
	}
}

// writable says whether the agent may write a cgroup file or make a
// cgroup directory at path (its parent, while it does not exist).
func writable(path string, root bool, degraded string) (string, Status, string) {
	target := path
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		target = filepath.Dir(path)
	}
	err := unix.Access(target, unix.W_OK)
	switch {
	case err == nil:
		return path + " writable", OK, ""
	case errors.Is(err, syscall.EROFS):
		return path + " is on a read-only mount: " + degraded, Warn, "drop ProtectControlGroups= from the unit (and keep Delegate=yes)"
	case !root:
		return path + " is not writable (not root): " + degraded, Warn, "run the agent as root"
	}
	return fmt.Sprintf("%s: %v: %s", path, err, degraded), Warn, "run the agent as root, from its unit (Delegate=yes)"
}

// v2CgroupOf reads the cgroup2 path of a process.
func v2CgroupOf(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p, nil
		}
	}
	return "", errors.New("no cgroup2 line")
}

// checkFavorDynMods warns where cgroup migrations take the global lock in
// its slow mode (Linux 6.0+ default): each waits an RCU grace period and
// holds up every fork on the host meanwhile. The sandbox migrates off the
// start path (slots made ahead), so this costs throughput, not latency.
func (c *checker) checkFavorDynMods() {
	const key = "favordynmods"
	l, err := c.layout()
	if err != nil {
		return
	}
	cmdline, _ := os.ReadFile(filepath.Join(c.cfg.ProcDir, "cmdline"))
	on, how := favorDynMods(l, string(cmdline))
	if on {
		c.add(Check{Name: key, Status: OK, Detail: "on (" + how + ")"})
		return
	}
	fix := "boot with cgroup_favordynmods=true (Linux 6.7+)"
	if l.v2 != "" && len(l.v1) == 0 {
		fix = "mount -o remount,favordynmods " + l.v2 + ", or " + fix
	}
	c.add(Check{Name: key, Status: Warn, Detail: "off: each cgroup migration (making a slot) waits an RCU grace period and stalls forks host-wide meanwhile", Fix: fix})
}

// favorDynMods finds favordynmods in the cgroup2 mount's options or the
// kernel command line.
func favorDynMods(l cgroupLayout, cmdline string) (bool, string) {
	if _, ok := l.v2Opts["favordynmods"]; ok {
		return true, "cgroup2 mount option"
	}
	for _, arg := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(arg, "cgroup_favordynmods="); ok {
			switch strings.ToLower(v) {
			case "1", "y", "yes", "true", "on":
				return true, "kernel command line"
			}
		}
	}
	return false, ""
}

// clockSynced asks the kernel whether the clock is synchronized (NTP).
func clockSynced() (bool, error) {
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return false, err
	}
	return state != unix.TIME_ERROR, nil
}
