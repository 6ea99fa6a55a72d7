#!/usr/bin/env python3
"""A Python function with the standard library only: no requirements to install.

flux-agent deploy examples/hello-py --name primes --handler handler.py
flux-agent invoke primes -- 200000
"""
import json
import os
import sys
import time


def primes_below(n):
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return sum(sieve)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    print(f"Python {sys.version.split()[0]}, execution {os.environ.get('FLUX_EXECUTION_ID')}", flush=True)
    start = time.monotonic()
    count = primes_below(n)
    print(json.dumps({"below": n, "primes": count, "seconds": round(time.monotonic() - start, 3)}))


if __name__ == "__main__":
    main()
