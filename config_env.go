package main

import (
	"errors"
	"fmt"
)

// applyEnv sets every key whose FLUX_AGENT_ variable lookup finds, over
// what the file said. A variable set to "" sets the key to "" (or an empty
// list): FLUX_AGENT_NETWORK_PUBLIC_IP_URL= turns the lookup off. For keys
// with no empty value (numbers, sizes) it is an error, as in the file.
func (c *Config) applyEnv(lookup func(key string) (string, bool)) error {
	var errs []error
	for _, s := range settings(c) {
		text, ok := lookup(s.envName())
		if !ok {
			continue
		}
		if err := s.set(text); err != nil {
			errs = append(errs, fmt.Errorf("%s (%s): %w", s.envName(), s.key, err))
		}
	}
	return errors.Join(errs...)
}
