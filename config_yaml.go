package main

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"text/tabwriter"

	"go.yaml.in/yaml/v3"
)

// Parse decodes YAML over c. Unknown keys, keys set twice and values that
// do not parse are errors that name the key and its line; a key with no
// value keeps its default.
func (c *Config) Parse(r io.Reader) error {
	var doc yaml.Node
	if err := yaml.NewDecoder(r).Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty file
		}
		return fmt.Errorf("parse YAML: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	d := yamlDecoder{leaves: map[string]setting{}, sections: map[string]bool{}}
	for _, s := range settings(c) {
		d.leaves[s.key] = s
		for i := range len(s.key) {
			if s.key[i] == '.' {
				d.sections[s.key[:i]] = true
			}
		}
	}
	d.mapping(doc.Content[0], "")
	return errors.Join(d.errs...)
}

// yamlDecoder walks a YAML document along the keys of the Config's
// settings, so that every error can say which key it is about.
type yamlDecoder struct {
	leaves   map[string]setting
	sections map[string]bool
	errs     []error
}

func (d *yamlDecoder) fail(key string, line int, err error) {
	d.errs = append(d.errs, fmt.Errorf("%s: %w (line %d)", key, err, line))
}

// mapping decodes a block of keys; path is its own key ("" for the
// document).
func (d *yamlDecoder) mapping(node *yaml.Node, path string) {
	node = dealias(node)
	if isNull(node) {
		return
	}
	if node.Kind != yaml.MappingNode {
		where := path
		if where == "" {
			where = "the document"
		}
		d.fail(where, node.Line, fmt.Errorf("want a mapping of keys, got %s", nodeKind(node)))
		return
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(node.Content); i += 2 {
		keyNode, value := node.Content[i], node.Content[i+1]
		key := keyNode.Value
		if path != "" {
			key = path + "." + key
		}
		if first, twice := seen[key]; twice {
			d.fail(key, keyNode.Line, fmt.Errorf("set twice (first on line %d)", first))
			continue
		}
		seen[key] = keyNode.Line
		if d.sections[key] {
			d.mapping(value, key)
		} else if s, ok := d.leaves[key]; ok {
			d.leaf(s, value)
		} else {
			d.fail(key, keyNode.Line, errors.New("unknown key"))
		}
	}
}

// leaf decodes one value: a scalar, or for a list a YAML sequence of
// scalars (a scalar is then read as a comma-separated list, as in the
// environment).
func (d *yamlDecoder) leaf(s setting, node *yaml.Node) {
	node = dealias(node)
	var err error
	switch {
	case isNull(node):
		return
	case node.Kind == yaml.ScalarNode:
		err = s.set(node.Value)
	case node.Kind == yaml.SequenceNode && s.isList():
		items := make([]string, len(node.Content))
		for i, item := range node.Content {
			if item = dealias(item); item.Kind != yaml.ScalarNode {
				err = fmt.Errorf("item %d: want a value, got %s", i+1, nodeKind(item))
				break
			}
			items[i] = item.Value
		}
		if err == nil {
			err = s.setItems(items)
		}
	case s.isList():
		err = fmt.Errorf("want a list of values, got %s", nodeKind(node))
	default:
		err = fmt.Errorf("want a single value, got %s", nodeKind(node))
	}
	if err != nil {
		d.fail(s.key, node.Line, err)
	}
}

// dealias follows an alias (*name) to the node it names.
func dealias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	case yaml.ScalarNode:
		return fmt.Sprintf("%q", n.Value)
	default:
		return "something else"
	}
}

// printConfig shows the effective configuration for check-config, as YAML
// made from the Config itself, so no key can be left out and the output is
// a valid config file. Secrets hide themselves: a RedisAddr prints without
// its password.
func printConfig(w io.Writer, cfg Config) error {
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("render config: %w", err)
	}
	fmt.Fprintln(w, "# configuration is valid; effective values:")
	if cfg.MaxTasks == TaskLimitAuto {
		fmt.Fprintf(w, "# max_tasks: auto is %d on this node (%d per CPU)\n", cfg.MaxTasks.Resolve(runtime.NumCPU()), TasksPerCPU)
	}
	_, err = w.Write(data)
	return err
}

// writeDefaults lists every key with its default and its environment
// variable, for --help.
func writeDefaults(w io.Writer) {
	cfg := DefaultConfig()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  key\tdefault\tenvironment variable")
	for _, s := range settings(&cfg) {
		text, err := yaml.Marshal(s.field.Interface())
		if err != nil {
			text = []byte(err.Error()) // not seen: every value type marshals
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", s.key, strings.TrimSpace(string(text)), s.envName())
	}
	tw.Flush()
}
