package service

import "os"

// baseEnv is the minimal environment every function starts from. Windows
// programs need SystemRoot and friends to load at all; their values are the
// machine's, not secrets of the agent.
func baseEnv() map[string]string {
	env := map[string]string{}
	for _, k := range []string{"SystemRoot", "SystemDrive", "windir", "ComSpec", "PATHEXT", "NUMBER_OF_PROCESSORS", "PROCESSOR_ARCHITECTURE"} {
		if v, ok := os.LookupEnv(k); ok {
			env[k] = v
		}
	}
	root := env["SystemRoot"]
	if root == "" {
		root = `C:\Windows`
	}
	env["PATH"] = root + `\system32;` + root + `;` + root + `\System32\Wbem`
	return env
}
