package doctor

import "errors"

// On Windows a job object contains each execution and the agent runs
// functions as its own account: the Linux host checks do not apply.

func (c *checker) checkAppsDir() {}

func (c *checker) checkNetwork() {}

func (c *checker) checkCgroups() {
	c.add(Check{Name: "sandbox", Status: OK, Detail: "a job object per execution (Windows)"})
}

func (c *checker) checkFavorDynMods() {}

func clockSynced() (bool, error) { return false, errors.New("not known on Windows") }

// The runner user and uid ranges are Linux's: on Windows functions run as
// the agent's account, inside a job object.

func (c *checker) checkRoot() {}

func (c *checker) checkRunner() {}

func (c *checker) checkUIDRange() {}
