"""Redis-side cost of two Lua scripts, in interleaved batches (so both see the same
machine): microseconds Redis spends per EVALSHA, from INFO commandstats.

    bench/redis_script_cost.sh A.lua B.lua [KIND_A KIND_B]

KIND is how a script is called: `tb` (apply.lua's arguments for one token bucket, on
1,000 keys), `sp` (one budget reservation, on 1,000 budgets), `bare` (the bare bucket of
redis_bench: one argument) or `bare13` (the bare bucket with twelve more arguments it
does not read). Run with `bench/redis_script_cost.sh`.
"""
import os
import sys
import time

import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
t0 = int(time.time() * 1000)
prefix = f"tollgate-script-cost:{os.getpid()}"


def tb_args(i):
    # now, commit, one operation: a token bucket, enforcing, limit, per, burst
    return (t0 + i // 10, 1, 1, "tb", 1, 1000000000, 60000, 1)


def sp_args(i):
    # now, commit, one operation: a monthly budget reserving 10 micro-dollars, then the
    # reservation TTL, the decision id, the prefix and no lease
    label = '{"by":["user"],"policy":"p","rule":"m","values":["u"]}'
    return (t0 + i // 10, 1, 1, "sp", 1, 10**12, 10, t0 - 10**9, "", label,
            900000, f"{i:032x}", prefix, "")


def padded_args(i):
    # the bare bucket's one argument and twelve it does not read
    return (t0 + i // 10,) + ("0",) * 12


KINDS = {
    "tb": (lambda i: (1, f"{prefix}:tb:{i % 1000}"), tb_args),
    "bare": (lambda i: (1, f"{prefix}:bare:{i % 1000}"), lambda i: (t0 + i // 10,)),
    "sp": (lambda i: (2, f"{prefix}:sp:{i % 1000}", f"{prefix}:d:{i:032x}"), sp_args),
    "bare13": (lambda i: (1, f"{prefix}:bare:{i % 1000}"), padded_args),
}


def evalsha_stats():
    s = r.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return s["usec"], s["calls"]


def main():
    paths = sys.argv[1:3]
    kinds = sys.argv[3:5] or ["tb", "tb"]
    scripts = [(r.script_load(open(p).read()),) + KINDS[k] for p, k in zip(paths, kinds)]
    # each script on keys of its own (two versions may store a counter differently)
    totals = [[0, 0], [0, 0]]
    i = 0
    for _ in range(30):
        for s, (sha, keys, args) in enumerate(scripts):
            u0, c0 = evalsha_stats()
            pipe = r.pipeline(transaction=False)
            for k in range(2000):
                nkeys, *names = keys(i)
                pipe.evalsha(sha, nkeys, *(f"{name}:{s}" for name in names), *args(i))
                i += 1
                if k % 500 == 499:
                    pipe.execute()
            pipe.execute()
            u1, c1 = evalsha_stats()
            totals[s][0] += u1 - u0
            totals[s][1] += c1 - c0
    for key in r.scan_iter(f"{prefix}:*", count=1000):
        r.delete(key)
    a, b = (u / c for u, c in totals)
    print(f"{paths[0]} ({kinds[0]}): {a:.2f} µs/call in Redis")
    print(f"{paths[1]} ({kinds[1]}): {b:.2f} µs/call in Redis")
    print(f"ratio: {b / a:.2f}")


main()
