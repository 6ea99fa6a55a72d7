package deployments

import (
	"errors"
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	for _, c := range []struct {
		name  string
		valid bool
	}{
		{"hello", true},
		{"a", true},
		{"9lives", true},
		{"my-func_v1.2", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{".", false},
		{"..", false},
		{".hidden", false},
		{"-flag", false},
		{"_x", false},
		{"../../tmp/evil", false},
		{"a/b", false},
		{`a\b`, false},
		{"a b", false},
		{"a\x00b", false},
		{"ünicode", false},
		{"x:y", false},
	} {
		err := ValidName(c.name)
		if c.valid && err != nil {
			t.Errorf("ValidName(%q) = %v, want nil", c.name, err)
		}
		if !c.valid && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidName(%q) = %v, want an error wrapping ErrInvalidName", c.name, err)
		}
	}
}

func TestValidHandler(t *testing.T) {
	for _, c := range []struct {
		handler string
		valid   bool
	}{
		{"main.sh", true},
		{"bin/run", true},
		{"a/b/c.py", true},
		{".hidden/run", true},
		{"", false},
		{".", false},
		{"/bin/sh", false},
		{"../run", false},
		{"bin/../run", false},
		{"bin/..", false},
		{"./run", false},
		{"bin//run", false},
		{"bin/", false},
		{`bin\run`, false},
		{"run\x00", false},
	} {
		err := ValidHandler(c.handler)
		if c.valid && err != nil {
			t.Errorf("ValidHandler(%q) = %v, want nil", c.handler, err)
		}
		if !c.valid && !errors.Is(err, ErrInvalidHandler) {
			t.Errorf("ValidHandler(%q) = %v, want an error wrapping ErrInvalidHandler", c.handler, err)
		}
	}
}
