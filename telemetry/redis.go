package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// spanRedisPipeline prefixes a pipeline's span name, followed by the names
// of the commands it sends ("redis.pipeline setrange expire").
const spanRedisPipeline = "redis.pipeline"

// ErrUnsupportedRedisClient is returned by InstrumentRedis for a client type
// it cannot hook into.
var ErrUnsupportedRedisClient = errors.New("unsupported Redis client")

// redisScopeName tells the Redis spans apart from the agent's own.
const redisScopeName = ScopeName + "/redis"

// Bounds on what one pipeline span lists, so a large pipeline costs a fixed
// amount of span.
const (
	maxPipelineNames = 8
	maxPipelineKeys  = 8
)

// keyedCommands are the commands whose first argument is a key. A command
// not listed gets a span without a key: the instrumentation never guesses
// which argument is a key, because a wrong guess would record a value.
var keyedCommands = map[string]bool{
	"get": true, "set": true, "setnx": true, "setex": true, "getex": true, "getdel": true,
	"setrange": true, "getrange": true, "append": true, "strlen": true,
	"incr": true, "incrby": true, "decr": true, "decrby": true,
	"del": true, "unlink": true, "exists": true, "type": true,
	"expire": true, "pexpire": true, "expireat": true, "pexpireat": true, "persist": true, "ttl": true, "pttl": true,
	"hset": true, "hsetnx": true, "hget": true, "hmget": true, "hdel": true, "hgetall": true,
	"hkeys": true, "hvals": true, "hlen": true, "hexists": true,
	"sadd": true, "srem": true, "smembers": true, "sismember": true, "scard": true, "sscan": true,
	"lpush": true, "rpush": true, "lrange": true, "llen": true,
	"watch": true,
}

// InstrumentRedis traces rdb's commands, pipelines and dials as client spans
// under the span that issued them. A span names the command (span name and
// db.operation.name) and its key (flux.redis.key), the server, and on
// failure the kind of error (error.type: a Redis error code such as
// WRONGTYPE, "timeout", …). It never records a command's other arguments, a
// reply, or an error message (Redis quotes arguments in some of them): values
// the agent writes hold function env, arguments and output.
//
// A command issued with no span in its context (readiness pings, a Cluster
// client's own slot refreshes) records nothing: a trace of one lone command
// is noise that would take room in the export queue.
//
// Cluster and Ring clients are instrumented on each node as it is created,
// so call InstrumentRedis before the first command.
func InstrumentRedis(rdb redis.UniversalClient, tp trace.TracerProvider) error {
	tracer := tp.Tracer(redisScopeName, trace.WithInstrumentationVersion(redis.Version()))
	switch c := rdb.(type) {
	case *redis.Client:
		c.AddHook(newRedisHook(tracer, c.Options().Addr))
	case *redis.ClusterClient:
		c.OnNewNode(func(node *redis.Client) { node.AddHook(newRedisHook(tracer, node.Options().Addr)) })
	case *redis.Ring:
		c.OnNewNode(func(node *redis.Client) { node.AddHook(newRedisHook(tracer, node.Options().Addr)) })
	default:
		return fmt.Errorf("%w: %T", ErrUnsupportedRedisClient, rdb)
	}
	return nil
}

// redisHook makes the spans of one Redis server's client.
type redisHook struct {
	tracer trace.Tracer
	start  []trace.SpanStartOption
}

func newRedisHook(tracer trace.Tracer, addr string) *redisHook {
	attrs := []attribute.KeyValue{semconv.DBSystemNameRedis}
	// A Sentinel-managed client's Addr is a placeholder, not host:port; its
	// spans then carry no server.
	if host, port, err := net.SplitHostPort(addr); err == nil {
		attrs = append(attrs, semconv.ServerAddress(host))
		if n, err := strconv.Atoi(port); err == nil {
			attrs = append(attrs, semconv.ServerPort(n))
		}
	}
	return &redisHook{
		tracer: tracer,
		start:  []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...)},
	}
}

// traced reports whether ctx holds a span for the Redis span to join.
func traced(ctx context.Context) bool {
	return trace.SpanContextFromContext(ctx).IsValid()
}

// DialHook traces opening a connection.
func (h *redisHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if !traced(ctx) {
			return next(ctx, network, addr)
		}
		ctx, span := h.tracer.Start(ctx, SpanRedisDial, h.start...)
		defer span.End()
		conn, err := next(ctx, network, addr)
		recordRedisError(span, err)
		return conn, err
	}
}

// ProcessHook traces one command.
func (h *redisHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !traced(ctx) {
			return next(ctx, cmd)
		}
		name := cmd.FullName()
		ctx, span := h.tracer.Start(ctx, name, h.start...)
		defer span.End()
		attrs := []attribute.KeyValue{semconv.DBOperationName(name)}
		if key, ok := commandKey(cmd); ok {
			attrs = append(attrs, AttrRedisKey.String(key))
		}
		span.SetAttributes(attrs...)
		err := next(ctx, cmd)
		recordRedisError(span, err)
		return err
	}
}

// ProcessPipelineHook traces a pipeline (or transaction) as one span named
// after its commands, listing their distinct keys.
func (h *redisHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !traced(ctx) {
			return next(ctx, cmds)
		}
		var names, keys []string
		for _, cmd := range cmds {
			if name := cmd.Name(); len(names) < maxPipelineNames && !slices.Contains(names, name) {
				names = append(names, name)
			}
			if key, ok := commandKey(cmd); ok && len(keys) < maxPipelineKeys && !slices.Contains(keys, key) {
				keys = append(keys, key)
			}
		}
		summary := strings.Join(names, " ")
		ctx, span := h.tracer.Start(ctx, spanRedisPipeline+" "+summary, h.start...)
		defer span.End()
		span.SetAttributes(
			semconv.DBQuerySummary(summary),
			semconv.DBOperationBatchSize(len(cmds)),
			AttrRedisKeys.StringSlice(keys),
		)
		err := next(ctx, cmds)
		recordRedisError(span, err)
		return err
	}
}

// commandKey returns cmd's key when cmd is known to take one first.
func commandKey(cmd redis.Cmder) (string, bool) {
	args := cmd.Args()
	if len(args) < 2 || !keyedCommands[cmd.Name()] {
		return "", false
	}
	key, ok := args[1].(string)
	return key, ok
}

// recordRedisError marks span failed with the kind of err, never its text.
// redis.Nil (a missing key) is an answer, not a failure.
func recordRedisError(span trace.Span, err error) {
	if err == nil || errors.Is(err, redis.Nil) {
		return
	}
	kind := redisErrorKind(err)
	span.SetAttributes(semconv.ErrorTypeKey.String(kind))
	span.SetStatus(codes.Error, kind)
}

// redisErrorKind names err without quoting it: the error code a Redis
// server puts first in its reply ("WRONGTYPE", "LOADING", "MOVED"), or one
// of timeout, canceled, pool_timeout, closed, network and other. (Even the
// client's own messages can quote a reply it could not parse.)
func redisErrorKind(err error) string {
	var redisErr redis.Error
	var netErr net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, redis.ErrPoolTimeout):
		return "pool_timeout"
	case errors.Is(err, redis.ErrClosed):
		return "closed"
	case errors.As(err, &redisErr):
		code, _, _ := strings.Cut(redisErr.Error(), " ")
		if code == "" || code != strings.ToUpper(code) || len(code) > 32 {
			return "redis"
		}
		return code
	case errors.As(err, &netErr) && netErr.Timeout():
		return "timeout"
	case errors.As(err, &netErr):
		return "network"
	default:
		return "other"
	}
}

// RedisLogger carries go-redis's own messages (a dial that failed, a pool
// that was closed, a sentinel that switched master) into logger at debug
// level, instead of the standard logger on stderr: the agent logs and
// counts the failures that matter to an operator where it meets them, and
// a Redis outage must not write a line per retry. Install it with
// redis.SetLogger before the first client is made.
type RedisLogger struct{ Logger *slog.Logger }

// Printf implements go-redis's internal logging interface.
func (l RedisLogger) Printf(ctx context.Context, format string, v ...any) {
	if !l.Logger.Enabled(ctx, slog.LevelDebug) {
		return
	}
	l.Logger.DebugContext(ctx, "redis client", "msg", fmt.Sprintf(format, v...))
}
