package doctor

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"

	"github.com/serverless-fabric/flux-agent/sandbox"
)

func (c *checker) checkRoot() {
	if c.root {
		return
	}
	c.add(Check{Name: "root", Status: Warn,
		Detail: "not root: functions would run as this user, without cgroups, namespaces or a network policy",
		Fix:    "run the agent (and doctor) as root, as the .deb's unit does"})
}

// checkRunner looks the runner user up; as root a missing one fails: the
// sandbox would run functions as root.
func (c *checker) checkRunner() {
	const key = "sandbox.run_as_user"
	name := c.cfg.RunAsUser
	bad := Warn
	if c.root {
		bad = Fail
	}
	if name == "" {
		c.add(Check{Name: key, Status: bad, Detail: "empty: functions would run as the agent's own user",
			Fix: "set sandbox.run_as_user: flux-runner (the .deb creates it)"})
		return
	}
	u, err := c.cfg.LookupUser(name)
	var unknown user.UnknownUserError
	if errors.As(err, &unknown) {
		c.add(Check{Name: key, Status: bad, Detail: fmt.Sprintf("user %q does not exist", name),
			Fix: fmt.Sprintf("create it: useradd --system --user-group --no-create-home --shell /usr/sbin/nologin %s (the .deb does), or set sandbox.run_as_user to an unprivileged user", name)})
		return
	}
	if err != nil {
		c.add(Check{Name: key, Status: bad, Detail: fmt.Sprintf("user %q: %v", name, err), Fix: "check the user database (getent passwd " + name + ")"})
		return
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		c.add(Check{Name: key, Status: bad, Detail: fmt.Sprintf("user %q has uid %q and gid %q, not numbers", name, u.Uid, u.Gid), Fix: "use a Unix user"})
		return
	}
	if uid == 0 || gid == 0 {
		c.add(Check{Name: key, Status: bad, Detail: fmt.Sprintf("user %q has uid %d, gid %d: functions would run with root's rights", name, uid, gid),
			Fix: "set sandbox.run_as_user to an unprivileged user (flux-runner)"})
		return
	}
	if !c.root {
		c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("%s (uid %d, gid %d) exists; it is used when the agent runs as root", name, uid, gid)})
		return
	}
	c.runner = &runner{name: u.Username, uid: uint32(uid), gid: uint32(gid)}
	c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("%s (uid %d, gid %d)", name, uid, gid)})
}

// checkUIDRange finds the uids executions get: the configured range, or
// the runner's in /etc/subuid.
func (c *checker) checkUIDRange() {
	const key = "sandbox.uid_range"
	r := c.runner
	switch {
	case r == nil:
		return // not root, or no runner: already said
	case c.cfg.SharedUID:
		c.add(Check{Name: key, Status: Warn, Detail: fmt.Sprintf("shared: every execution runs as %s's own uid, so concurrent functions can see and signal each other", r.name),
			Fix: "set sandbox.uid_range: auto and reserve a range: " + reserveCommand(r.name)})
		return
	case c.cfg.UIDs.Count > 0:
		if c.cfg.UIDs.Contains(0) || c.cfg.UIDs.Contains(r.uid) {
			c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s holds root or %s's own uid", c.cfg.UIDs, r.name), Fix: "choose uids nobody uses, e.g. " + sandbox.DefaultUIDRange.String()})
			return
		}
		r.uids = c.cfg.UIDs
		c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("%s (%d uids, one per running execution)", r.uids, r.uids.Count)})
		return
	}
	path := c.cfg.EtcDir + "/subuid"
	f, err := os.Open(path)
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("auto, but %v", err), Fix: "reserve a range: " + reserveCommand(r.name) + ", or set sandbox.uid_range"})
		return
	}
	defer f.Close()
	found, err := subordinateRange(f, r.name, r.uid)
	if err != nil {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("auto, but %s has no range for %s in %s (%v)", r.name, r.name, path, err),
			Fix: "reserve one: " + reserveCommand(r.name) + ", or set sandbox.uid_range"})
		return
	}
	if found.Contains(r.uid) || found.Contains(0) {
		c.add(Check{Name: key, Status: Fail, Detail: fmt.Sprintf("%s's range %s in %s holds root or its own uid", r.name, found, path), Fix: "reserve another: " + reserveCommand(r.name)})
		return
	}
	r.uids = found
	c.add(Check{Name: key, Status: OK, Detail: fmt.Sprintf("%s from %s (%d uids, one per running execution)", found, path, found.Count)})
}

func reserveCommand(name string) string {
	r := sandbox.DefaultUIDRange
	return fmt.Sprintf("usermod --add-subuids %s --add-subgids %s %s", r, r, name)
}

// subordinateRange finds name's (or uid's) first range in a subuid(5)
// file: lines of NAME_OR_UID:FIRST:COUNT.
func subordinateRange(r io.Reader, name string, uid uint32) (sandbox.UIDRange, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return sandbox.UIDRange{}, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.Split(strings.TrimSpace(line), ":")
		if len(parts) != 3 || (parts[0] != name && parts[0] != strconv.FormatUint(uint64(uid), 10)) {
			continue
		}
		first, err1 := strconv.ParseUint(parts[1], 10, 32)
		count, err2 := strconv.ParseUint(parts[2], 10, 32)
		if err1 != nil || err2 != nil || count == 0 || first+count > 1<<32-1 {
			return sandbox.UIDRange{}, fmt.Errorf("malformed line %q", line)
		}
		return sandbox.UIDRange{First: uint32(first), Count: uint32(count)}, nil
	}
	return sandbox.UIDRange{}, errors.New("no line")
}
