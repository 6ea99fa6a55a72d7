package service

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"

	"github.com/redis/go-redis/v9"
)

// RedisAddresses lists the IP addresses of the Redis servers the agent
// uses, for the network policy that keeps functions away from them: the
// configured seeds as they resolve now (a Cluster's or the Sentinels'),
// every node of a Cluster's slot map, and the server each connection
// reaches (CLIENT INFO's laddr) with the replicas it names (ROLE). What is
// found is returned even when part of the discovery fails; an error only
// when nothing was found.
func RedisAddresses(ctx context.Context, rdb redis.UniversalClient, seeds []string) ([]netip.Addr, error) {
	found := map[netip.Addr]bool{}
	var errs []error
	add := func(hostport string) {
		host, _, err := net.SplitHostPort(hostport)
		if err != nil {
			host = hostport
		}
		addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil {
			errs = append(errs, err)
			return
		}
		for _, a := range addrs {
			found[a.Unmap()] = true
		}
	}
	for _, s := range seeds {
		add(s)
	}
	ask := func(ctx context.Context, c *redis.Client) error {
		info, err := c.Do(ctx, "CLIENT", "INFO").Text()
		if err != nil {
			return err
		}
		for _, f := range strings.Fields(info) {
			if laddr, ok := strings.CutPrefix(f, "laddr="); ok {
				add(laddr)
			}
		}
		role, err := c.Do(ctx, "ROLE").Slice()
		if err != nil || len(role) < 3 || role[0] != "master" {
			return err
		}
		replicas, _ := role[2].([]any)
		for _, r := range replicas {
			if fields, ok := r.([]any); ok && len(fields) >= 2 {
				host, _ := fields[0].(string)
				port, _ := fields[1].(string)
				add(net.JoinHostPort(host, port))
			}
		}
		return nil
	}
	switch c := rdb.(type) {
	case *redis.ClusterClient:
		if slots, err := c.ClusterSlots(ctx).Result(); err != nil {
			errs = append(errs, err)
		} else {
			for _, s := range slots {
				for _, n := range s.Nodes {
					add(n.Addr)
				}
			}
		}
	case *redis.Client:
		if err := ask(ctx, c); err != nil {
			errs = append(errs, err)
		}
	}
	if len(found) == 0 {
		return nil, errors.Join(append(errs, errors.New("no Redis address found"))...)
	}
	out := make([]netip.Addr, 0, len(found))
	for a := range found {
		out = append(out, a)
	}
	return out, nil
}
