//! Decisions per second through the Redis ledger against a same-run baseline: a bare
//! token-bucket Lua script called by SHA on the same kind of connection, and the number
//! of Redis commands (round trips) per decision. Baseline and tollgate alternate over
//! several rounds and the median ratio is reported: this machine's speed drifts within
//! seconds.
//!
//! `cargo run --release -p tollgate-redis --example redis_bench -- redis://127.0.0.1:6379`

use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis::Script;
use tollgate::{Engine, Micros, Request, SystemClock};
use tollgate_redis::RedisLedger;

const THREADS: usize = 2;
const PER_THREAD: usize = 20_000;
const ROUNDS: usize = 5;

// Shared with bench/redis_script_cost.sh.
const BUCKET: &str = include_str!("../../../bench/bare_bucket.lua");

/// What `INFO commandstats` says of script calls so far: how many were sent by clients
/// (EVALSHA, EVAL, SCRIPT LOAD — each a round trip; commands run inside scripts are not
/// among them) and the microseconds Redis spent in EVALSHA (the scripts' own cost,
/// without the client's or the network's).
struct ScriptStats {
    calls: u64,
    evalsha_usec: u64,
}

fn script_stats(url: &str) -> ScriptStats {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    let field = |line: &str, name: &str| -> u64 {
        line.split(name)
            .nth(1)
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut stats = ScriptStats {
        calls: 0,
        evalsha_usec: 0,
    };
    for line in info.lines() {
        let Some(command) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split(':').next())
        else {
            continue;
        };
        if ["evalsha", "eval", "script|load", "script"].contains(&command) {
            stats.calls += field(line, "calls=");
        }
        if command == "evalsha" {
            stats.evalsha_usec = field(line, "usec=");
        }
    }
    stats
}

/// Calls per second and microseconds spent in Redis per call.
struct Run {
    rate: f64,
    usec: f64,
    round_trips: f64,
    /// This process's CPU time (user and system, every thread) per call.
    client_usec: f64,
}

/// CPU time this process has used so far, in microseconds.
fn process_cpu_usec() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let usec = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    usec(usage.ru_utime) + usec(usage.ru_stime)
}

/// Runs `call(thread, i)` PER_THREAD times on each of THREADS threads.
fn measure(url: &str, call: impl Fn(usize, usize) + Sync) -> Run {
    let before = script_stats(url);
    let cpu = process_cpu_usec();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let call = &call;
            s.spawn(move || (0..PER_THREAD).for_each(|i| call(t, i)));
        }
    });
    let calls = (THREADS * PER_THREAD) as f64;
    let rate = calls / start.elapsed().as_secs_f64();
    let client_usec = (process_cpu_usec() - cpu) / calls;
    let after = script_stats(url);
    Run {
        rate,
        usec: (after.evalsha_usec - before.evalsha_usec) as f64 / calls,
        round_trips: (after.calls - before.calls) as f64 / calls,
        client_usec,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let prefix = format!("tollgate-bench:{}", std::process::id());

    // Baseline: the bare Lua token bucket, one EVALSHA per call, on a connection per thread.
    let script = Script::new(BUCKET);
    let connections: Vec<_> = (0..THREADS)
        .map(|_| {
            Mutex::new(
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap(),
            )
        })
        .collect();
    let baseline = || {
        measure(&url, |t, i| {
            let key = format!("{prefix}:base:{}", (t * PER_THREAD + i) % 1000);
            let mut c = connections[t].lock().unwrap();
            let _: i64 = script.key(key).arg(i as i64).invoke(&mut *c).unwrap();
        })
    };

    // tollgate, on the same work as the baseline (one token-bucket rate rule), then on a
    // policy with a rate limit, a budget and a cost velocity per user.
    let policies = [
        (
            "1 rate rule (the baseline's work)",
            "policies: [{name: p, rules: [
              {id: rpm, type: rate, limit: 1000000000, per: 1m, by: [user]}]}]",
        ),
        (
            "3 stateful rules: rate, budget, cost velocity",
            "policies: [{name: p, rules: [
              {id: rpm, type: rate, limit: 1000000000, per: 1m, by: [user]},
              {id: monthly, type: budget, limit_usd: 1000000, period: month, by: [user]},
              {id: velocity, type: cost_velocity, limit_usd: 1000000, window: 1h, by: [team]}]}]",
        ),
    ];
    let ledger = Arc::new(RedisLedger::connect(&url, &prefix, THREADS * 2).unwrap());
    let engines: Vec<Engine> = policies
        .iter()
        .map(|(_, policy)| {
            Engine::builder()
                .clock(Arc::new(SystemClock))
                .ledger(ledger.clone())
                .build_from_text(policy)
                .unwrap()
        })
        .collect();
    let decide = |engine: &Engine| {
        measure(&url, |t, i| {
            let mut r = Request::default();
            r.subject.user = Some(format!("u{}", (t * PER_THREAD + i) % 1000));
            r.subject.team = Some(format!("t{}", i % 10));
            r.estimate.cost_usd = Some(Micros(10));
            assert!(engine.check(&r).allowed);
        })
    };
    let mut ratios = vec![Vec::new(); policies.len()];
    for round in 1..=ROUNDS {
        let base = baseline();
        println!(
            "round {round}: bare Lua token bucket (EVALSHA): {:.0} calls/s, {:.1} µs in Redis and {:.1} µs of client CPU per call",
            base.rate, base.usec, base.client_usec
        );
        for ((name, _), (engine, ratios)) in policies.iter().zip(engines.iter().zip(&mut ratios)) {
            let run = decide(engine);
            ratios.push(run.rate / base.rate);
            println!(
                "round {round}: tollgate, {name}: {:.0} decisions/s, ratio {:.2}, {:.1} µs in Redis and {:.1} µs of client CPU per decision, {:.2} round trips per decision",
                run.rate,
                run.rate / base.rate,
                run.usec,
                run.client_usec,
                run.round_trips
            );
        }
    }
    for ((name, _), ratios) in policies.iter().zip(ratios) {
        println!(
            "median ratio over {ROUNDS} rounds, {name}: {:.2}",
            median(ratios)
        );
    }
    ledger.delete_all().unwrap();
}
