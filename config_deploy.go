package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/serverless-fabric/flux-agent/deployments"
	"github.com/serverless-fabric/flux-agent/service"
)

// DeployConfig bounds what one code archive may unpack to.
type DeployConfig struct {
	MaxBytes ByteSize `yaml:"max_bytes"`
	MaxFiles int      `yaml:"max_files"`
	MaxRatio int      `yaml:"max_ratio"`
	// KeepVersions is how many superseded versions stay; 0 keeps none.
	KeepVersions int `yaml:"keep_versions"`
}

func defaultDeployConfig() DeployConfig {
	return DeployConfig{
		MaxBytes:     deployments.DefaultMaxBytes,
		MaxFiles:     deployments.DefaultMaxFiles,
		MaxRatio:     deployments.DefaultMaxRatio,
		KeepVersions: deployments.DefaultKeep,
	}
}

func (d DeployConfig) validate() []error {
	var errs []error
	if d.MaxBytes <= 0 {
		errs = append(errs, keyError("max_bytes", "must be positive"))
	}
	if d.MaxFiles <= 0 {
		errs = append(errs, keyError("max_files", "must be positive"))
	}
	if d.MaxRatio <= 0 {
		errs = append(errs, keyError("max_ratio", "must be positive"))
	}
	if d.KeepVersions < 0 {
		errs = append(errs, keyError("keep_versions", "must not be negative"))
	}
	return errs
}

// deployOptions is the deploy section in the deployments package's terms:
// keep_versions 0 (keep none) becomes a negative Keep, since the package
// reads 0 as its default.
func (c *Config) deployOptions(logger *slog.Logger) deployments.Options {
	keep := c.Deploy.KeepVersions
	if keep == 0 {
		keep = -1
	}
	return deployments.Options{
		Limits: deployments.Limits{
			MaxBytes: int64(c.Deploy.MaxBytes),
			MaxFiles: c.Deploy.MaxFiles,
			MaxRatio: c.Deploy.MaxRatio,
		},
		Keep:    keep,
		Foreign: service.FunctionFiles,
		Logger:  logger,
	}
}

// makeSpoolDir makes, beside apps_dir (on the same disk, never in memory),
// the directory where running executions keep a copy of their output in
// case Redis loses it, readable by the agent alone, and returns it.
func (c *Config) makeSpoolDir() (string, error) {
	dir := filepath.Join(filepath.Dir(filepath.Clean(c.AppsDir)), "spool")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("output spool beside apps_dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return "", fmt.Errorf("output spool beside apps_dir: %w", err)
	}
	return dir, nil
}
