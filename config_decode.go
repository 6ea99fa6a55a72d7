package main

import (
	"encoding"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// setting is one leaf of the Config: a key of the YAML file, which is also,
// upper-cased behind FLUX_AGENT_, an environment variable. The file and the
// environment set it through the same parser, so they accept the same
// values.
type setting struct {
	key   string        // "tls.enabled"
	field reflect.Value // addressable
}

// settings lists every leaf of c, in the order Config declares them. The
// YAML decoder, the environment and --help all read this one list.
func settings(c *Config) []setting {
	var out []setting
	var walk func(v reflect.Value, prefix string)
	walk = func(v reflect.Value, prefix string) {
		for i := range v.NumField() {
			key, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("yaml"), ",")
			if key == "" || key == "-" {
				continue
			}
			if field := v.Field(i); isSection(field) {
				walk(field, prefix+key+".")
			} else {
				out = append(out, setting{key: prefix + key, field: field})
			}
		}
	}
	walk(reflect.ValueOf(c).Elem(), "")
	return out
}

// isSection tells a block of keys (tls:) from a value that happens to be a
// struct (a RedisAddr parses itself).
func isSection(field reflect.Value) bool {
	_, parses := field.Addr().Interface().(encoding.TextUnmarshaler)
	return field.Kind() == reflect.Struct && !parses
}

// envName is the environment variable that overrides s.
func (s setting) envName() string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(s.key, ".", "_"))
}

// isList reports a key that takes several values: a YAML list, or one
// comma-separated string.
func (s setting) isList() bool { return s.field.Kind() == reflect.Slice }

// set sets s from its written form. A list takes comma-separated items; an
// empty string empties it.
func (s setting) set(text string) error {
	if !s.isList() {
		return setValue(s.field, text)
	}
	var items []string
	if strings.TrimSpace(text) != "" {
		items = strings.Split(text, ",")
	}
	return s.setItems(items)
}

// setItems sets a list from its items, each parsed as one value. The list
// is left as it was when an item is wrong.
func (s setting) setItems(items []string) error {
	if len(items) == 0 {
		s.field.SetZero()
		return nil
	}
	list := reflect.MakeSlice(s.field.Type(), len(items), len(items))
	for i, item := range items {
		item = strings.TrimSpace(item)
		if item == "" {
			return fmt.Errorf("item %d is empty", i+1)
		}
		if err := setValue(list.Index(i), item); err != nil {
			return fmt.Errorf("item %d: %w", i+1, err)
		}
	}
	s.field.Set(list)
	return nil
}

var durationType = reflect.TypeFor[time.Duration]()

// setValue parses text into one value: types of this package parse
// themselves (UnmarshalText); strings, numbers, booleans and durations are
// read here, the way YAML and Go write them.
func setValue(v reflect.Value, text string) error {
	if u, ok := v.Addr().Interface().(encoding.TextUnmarshaler); ok {
		return u.UnmarshalText([]byte(text))
	}
	trimmed := strings.TrimSpace(text)
	if v.Type() == durationType {
		d, err := time.ParseDuration(trimmed)
		if err != nil {
			return fmt.Errorf("%q is not a duration (e.g. 30s, 15m, 24h)", text)
		}
		v.SetInt(int64(d))
		return nil
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(text)
	case reflect.Bool:
		b, err := parseBool(trimmed)
		if err != nil {
			return err
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int64:
		// Base 0, as YAML reads integers: 0x10 and 1_000 work too.
		n, err := strconv.ParseInt(trimmed, 0, v.Type().Bits())
		if err != nil {
			return fmt.Errorf("%q is not a whole number", text)
		}
		v.SetInt(n)
	default:
		return fmt.Errorf("no parser for %s", v.Type()) // a Config field of a new kind
	}
	return nil
}

// parseBool reads true/false as Go does and yes/no/on/off as YAML 1.1 does,
// so that a file written either way means what it says.
func parseBool(s string) (bool, error) {
	switch strings.ToLower(s) {
	case "yes", "on":
		return true, nil
	case "no", "off":
		return false, nil
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		return false, fmt.Errorf("%q is not true or false", s)
	}
	return b, nil
}
