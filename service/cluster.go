package service

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterReloadEvery bounds how often a failing command makes a Cluster
// client re-read the slot map; go-redis coalesces reloads within 200 ms
// itself.
const clusterReloadEvery = 200 * time.Millisecond

// clusterFollower is a hook that makes a Redis Cluster client re-read the
// slot map as soon as a command fails (a refused or broken connection, a
// timeout, CLUSTERDOWN; any error but a missing key or a cancel, which
// cost a rate-limited reload at worst). go-redis re-reads it
// only on MOVED/ASK or every 60 s: after a master dies, nothing answers
// MOVED, and writes would keep going to the dead master for up to a minute
// although its replica took over within seconds. Reloads are rate-limited:
// during an outage every command fails.
type clusterFollower struct {
	client *redis.ClusterClient
	last   atomic.Int64 // UnixNano of the last reload asked for
}

func (f *clusterFollower) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f *clusterFollower) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		f.failed(err)
		return err
	}
}

func (f *clusterFollower) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		f.failed(err)
		return err
	}
}

// failed asks for a reload after an error that may mean the slot map
// changed.
func (f *clusterFollower) failed(err error) {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) {
		return
	}
	now := time.Now().UnixNano()
	last := f.last.Load()
	if now-last < int64(clusterReloadEvery) || !f.last.CompareAndSwap(last, now) {
		return
	}
	f.client.ReloadState(context.Background())
}
