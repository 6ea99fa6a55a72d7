package service

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/serverless-fabric/flux-agent/deployments"
	fluxpb "github.com/serverless-fabric/flux-agent/proto"
	"github.com/serverless-fabric/flux-agent/sandbox"
)

// Concurrency behaviours Flux sends.
const (
	BehaviorWait = "wait"
	BehaviorExit = "exit"
)

// Bounds on what one function may ask for; they catch typos and hostile
// values, not real workloads.
const (
	maxEnvEntries  = 1024
	maxEnvBytes    = 1 << 20
	maxArgs        = 4096
	maxArgBytes    = 1 << 20
	maxTimeoutSecs = 7 * 24 * 3600
)

var executionIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`)

// validateFunction checks a FunctionConfig before anything is stored.
func validateFunction(fn *fluxpb.FunctionConfig) error {
	if err := deployments.ValidName(fn.GetName()); err != nil {
		return err
	}
	if err := deployments.ValidHandler(fn.GetHandler()); err != nil {
		return fmt.Errorf("function %s: %w", fn.GetName(), err)
	}
	switch {
	case fn.GetCpuMillicores() < 0:
		return fmt.Errorf("function %s: cpu_millicores must not be negative", fn.GetName())
	case fn.GetCpuMillicores() > 0 && fn.GetCpuMillicores() < sandbox.MinCPUMillicores:
		return fmt.Errorf("function %s: cpu_millicores must be 0 (no limit) or at least %d", fn.GetName(), sandbox.MinCPUMillicores)
	case fn.GetMemoryMb() < 0:
		return fmt.Errorf("function %s: memory_mb must not be negative", fn.GetName())
	case fn.GetMemoryMb() > 1<<30:
		return fmt.Errorf("function %s: memory_mb %d is beyond any machine", fn.GetName(), fn.GetMemoryMb())
	case fn.GetTimeoutSeconds() < 0 || fn.GetTimeoutSeconds() > maxTimeoutSecs:
		return fmt.Errorf("function %s: timeout_seconds must be between 0 (none) and %d", fn.GetName(), maxTimeoutSecs)
	case fn.GetMaxConcurrency() < 0:
		return fmt.Errorf("function %s: max_concurrency must not be negative", fn.GetName())
	}
	switch fn.GetMaxConcurrencyBehavior() {
	case "", BehaviorWait, BehaviorExit:
	default:
		return fmt.Errorf("function %s: max_concurrency_behavior %q must be %q or %q", fn.GetName(), fn.GetMaxConcurrencyBehavior(), BehaviorWait, BehaviorExit)
	}
	if len(fn.GetEnv()) > maxEnvEntries {
		return fmt.Errorf("function %s: %d env entries, at most %d", fn.GetName(), len(fn.GetEnv()), maxEnvEntries)
	}
	size := 0
	for k, v := range fn.GetEnv() {
		size += len(k) + len(v) + 2
		switch {
		case k == "":
			return fmt.Errorf("function %s: env has an empty key", fn.GetName())
		case strings.ContainsAny(k, "=\x00"):
			return fmt.Errorf("function %s: env key %q must not contain '=' or NUL", fn.GetName(), k)
		case strings.ContainsRune(v, 0):
			return fmt.Errorf("function %s: env %s has a NUL in its value", fn.GetName(), k)
		}
	}
	if size > maxEnvBytes {
		return fmt.Errorf("function %s: env is %d bytes, at most %d", fn.GetName(), size, maxEnvBytes)
	}
	return nil
}

// validateExecution checks what can be checked of an ExecutionRequest
// before anything is claimed.
func validateExecution(req *fluxpb.ExecutionRequest) error {
	id := req.GetExecutionId()
	switch {
	case id == "":
		return fmt.Errorf("%w: execution_id is empty", ErrInvalidRequest)
	case !executionIDPattern.MatchString(id):
		return fmt.Errorf("%w: execution_id %q must be 1-128 letters, digits, '.', '_', ':' or '-'", ErrInvalidRequest, id)
	}
	if err := deployments.ValidName(req.GetFunctionName()); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if len(req.GetArgs()) > maxArgs {
		return fmt.Errorf("%w: %d args, at most %d", ErrInvalidRequest, len(req.GetArgs()), maxArgs)
	}
	size := 0
	for i, a := range req.GetArgs() {
		size += len(a) + 1
		if strings.ContainsRune(a, 0) {
			return fmt.Errorf("%w: args[%d] contains a NUL byte", ErrInvalidRequest, i)
		}
	}
	if size > maxArgBytes {
		return fmt.Errorf("%w: args are %d bytes, at most %d", ErrInvalidRequest, size, maxArgBytes)
	}
	return nil
}
