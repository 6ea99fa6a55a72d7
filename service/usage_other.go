//go:build !linux

package service

import (
	"errors"
	"time"
)

// processFigures is what a running execution has used so far, for the
// admin's ListExecutions.
type processFigures struct {
	uid         int
	memoryBytes uint64
	cpuTime     time.Duration
}

// processUsage is not measured here: ListExecutions shows no figures.
func processUsage(int) (processFigures, error) {
	return processFigures{}, errors.New("execution figures are measured on Linux only")
}
