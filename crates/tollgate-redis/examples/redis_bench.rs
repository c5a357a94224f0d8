//! Decisions per second through the Redis ledger against a same-run baseline: a bare
//! token-bucket Lua script called by SHA on the same kind of connection, and the number
//! of Redis commands (round trips) per decision. This machine's speed drifts within
//! seconds, so baseline and tollgate alternate in short rounds (a fifth of a second or so
//! each), and the ratio is of their totals over every round; the spread of the rounds'
//! own ratios is printed beside it. Requests and keys are made before timing, on both
//! sides.
//!
//! `cargo run --release -p tollgate-redis --example redis_bench -- redis://127.0.0.1:6379`

use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis::Script;
use tollgate::{Engine, Micros, Request, SystemClock};
use tollgate_redis::RedisLedger;

const THREADS: usize = 2;
const PER_THREAD: usize = 4_000;
const ROUNDS: usize = 25;

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

/// One side's measures over a run of calls.
#[derive(Default)]
struct Run {
    calls: f64,
    seconds: f64,
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
    let seconds = start.elapsed().as_secs_f64();
    let client_usec = (process_cpu_usec() - cpu) / calls;
    let after = script_stats(url);
    Run {
        calls,
        seconds,
        usec: (after.evalsha_usec - before.evalsha_usec) as f64 / calls,
        round_trips: (after.calls - before.calls) as f64 / calls,
        client_usec,
    }
}

impl Run {
    /// Calls per second.
    fn rate(&self) -> f64 {
        self.calls / self.seconds
    }

    /// Adds a round, weighting the per-call figures by its calls.
    fn add(&mut self, round: &Run) {
        let calls = self.calls + round.calls;
        let mean = |a: f64, b: f64| (a * self.calls + b * round.calls) / calls;
        self.usec = mean(self.usec, round.usec);
        self.client_usec = mean(self.client_usec, round.client_usec);
        self.round_trips = mean(self.round_trips, round.round_trips);
        self.calls = calls;
        self.seconds += round.seconds;
    }

    fn describe(&self) -> String {
        format!(
            "{:.0}/s, {:.1} µs in Redis and {:.1} µs of client CPU per call, {:.2} round trips per call",
            self.rate(),
            self.usec,
            self.client_usec,
            self.round_trips
        )
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
    let keys: Vec<String> = (0..1000).map(|k| format!("{prefix}:base:{k}")).collect();
    let baseline = || {
        measure(&url, |t, i| {
            let key = &keys[(t * PER_THREAD + i) % 1000];
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
    let requests: Vec<Request> = (0..1000)
        .map(|k| {
            let mut r = Request::default();
            r.subject.user = Some(format!("u{k}"));
            r.subject.team = Some(format!("t{}", k % 10));
            r.estimate.cost_usd = Some(Micros(10));
            r
        })
        .collect();
    let decide = |engine: &Engine| {
        measure(&url, |t, i| {
            assert!(engine.check(&requests[(t * PER_THREAD + i) % 1000]).allowed);
        })
    };
    let mut base_total = Run::default();
    let mut totals: Vec<Run> = policies.iter().map(|_| Run::default()).collect();
    let mut ratios = vec![Vec::new(); policies.len()];
    for round in 1..=ROUNDS {
        let base = baseline();
        base_total.add(&base);
        let mut line = format!("round {round}:");
        for (i, engine) in engines.iter().enumerate() {
            let run = decide(engine);
            totals[i].add(&run);
            ratios[i].push(run.rate() / base.rate());
            line += &format!(" {:.2}", run.rate() / base.rate());
        }
        println!("{line} (ratio per policy)");
    }
    println!("bare Lua token bucket (EVALSHA): {}", base_total.describe());
    for (((name, _), total), ratios) in policies.iter().zip(&totals).zip(ratios) {
        let spread = {
            let mut r = ratios.clone();
            r.sort_by(f64::total_cmp);
            format!("rounds {:.2}–{:.2}", r[0], r[r.len() - 1])
        };
        println!("tollgate, {name}: {}", total.describe());
        println!(
            "ratio over {ROUNDS} interleaved rounds, {name}: {:.2} (median round {:.2}; {spread})",
            total.rate() / base_total.rate(),
            median(ratios),
        );
    }
    ledger.delete_all().unwrap();
}
