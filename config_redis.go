package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"

	"github.com/redis/go-redis/v9"
)

// RedisAddr is redis_addr, parsed once when the config is read: a redis://
// or rediss:// URL, a bare host:port, or a comma-separated list of
// host:port seeds (a Cluster, or Sentinels when redis_master_name is set).
// It prints without its password, so check-config and logs cannot leak it.
type RedisAddr struct {
	text string                 // as written
	opts redis.UniversalOptions // all but MasterName
}

// mustRedisAddr parses an address known to be good (a default).
func mustRedisAddr(text string) RedisAddr {
	var a RedisAddr
	if err := a.UnmarshalText([]byte(text)); err != nil {
		panic(fmt.Sprintf("redis address %q: %v", text, err))
	}
	return a
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (a *RedisAddr) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	if s == "" {
		return errors.New("must not be empty")
	}
	if strings.Contains(s, "://") {
		o, err := redis.ParseURL(s)
		if err != nil {
			// url.Parse's errors quote the whole URL, password and all.
			if urlErr := (*url.Error)(nil); errors.As(err, &urlErr) {
				err = urlErr.Err
			}
			return fmt.Errorf("%q: %w", redactURL(s), err)
		}
		*a = RedisAddr{text: s, opts: redis.UniversalOptions{
			Addrs: []string{o.Addr}, Username: o.Username, Password: o.Password,
			DB: o.DB, TLSConfig: o.TLSConfig,
			ClientName: o.ClientName, Protocol: o.Protocol,
			DialTimeout: o.DialTimeout, ReadTimeout: o.ReadTimeout, WriteTimeout: o.WriteTimeout,
			PoolSize: o.PoolSize, MinIdleConns: o.MinIdleConns, MaxRetries: o.MaxRetries,
			// Deadlines of the agent's contexts (health checks, final
			// writes) must bound socket reads too.
			ContextTimeoutEnabled: true,
		}}
		return nil
	}
	var addrs []string
	for _, addr := range strings.Split(s, ",") {
		addr = strings.TrimSpace(addr)
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
			return fmt.Errorf("%q is neither a redis:// URL nor host:port", addr)
		}
		addrs = append(addrs, addr)
	}
	*a = RedisAddr{text: s, opts: redis.UniversalOptions{Addrs: addrs, ContextTimeoutEnabled: true}}
	return nil
}

// MarshalText implements encoding.TextMarshaler, without the password.
func (a RedisAddr) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// String is the address as written, its password hidden.
func (a RedisAddr) String() string { return redactURL(a.text) }

// IsZero reports an address never set.
func (a RedisAddr) IsZero() bool { return a.text == "" }

// redactURL hides the password of a redis:// URL, even of one that does
// not parse: it is written in an error then.
func redactURL(addr string) string {
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		return addr
	}
	authority := rest
	if end := strings.IndexAny(rest, "/?#"); end >= 0 {
		authority = rest[:end]
	}
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return addr
	}
	user, _, hasPassword := strings.Cut(authority[:at], ":")
	if !hasPassword {
		return addr
	}
	return scheme + "://" + user + ":xxxxx" + rest[at:]
}

// RedisOptions are the client options for redis_addr and
// redis_master_name; each call returns a copy of its own to adjust.
func (c *Config) RedisOptions() *redis.UniversalOptions {
	o := c.RedisAddr.opts
	o.Addrs = slices.Clone(o.Addrs)
	if o.TLSConfig != nil {
		o.TLSConfig = o.TLSConfig.Clone()
	}
	o.MasterName = c.RedisMasterName
	return &o
}
