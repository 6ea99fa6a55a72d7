//go:build !windows

package service

// baseEnv is the minimal environment every function starts from; the
// sandbox adds HOME and TMPDIR of the execution's own scratch directory.
func baseEnv() map[string]string {
	return map[string]string{
		"PATH": "/usr/local/bin:/usr/bin:/bin",
		"LANG": "C.UTF-8",
	}
}
