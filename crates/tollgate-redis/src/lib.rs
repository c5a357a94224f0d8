//! # tollgate-redis
//!
//! A [`Ledger`] in Redis, shared by any number of tollgate instances. Each decision's
//! plan is applied by **one Lua script call** (one round trip): the script answers every
//! operation and commits all of them or none, so a limit holds exactly however many
//! instances check against it. Scripts are loaded once and called by SHA (reloaded on
//! `NOSCRIPT`). Time is the plan's `now` (the engine's clock), so a manual clock works.
//!
//! Counter keys are built from the policy, rule id and `by` values (not from the
//! in-process hash), so every instance names a counter the same way. Recorded spend is
//! also kept durably by the SQL store; Redis holds the hot counters.
//!
//! After a Redis loss (the `alive` marker is gone), one instance rebuilds live leases
//! and recorded spend from the SQL store ([`Restore`]); rate buckets start full and
//! in-flight reservations are gone.
#![warn(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use redis::{
    Client, Cmd, Connection, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind,
};
use serde::Serializer as _;
use serde_json::{Value, json};

use tollgate::Micros;
use tollgate::duration::Millis;
use tollgate::ledger::{
    Algorithm, Apply, CounterKey, Ledger, LedgerError, OpKind, OpResult, OpResults, Plan,
    RecordOutcome, Restore, SpendSink, SpendUsage,
};
use tollgate::request::{Dimension, Subject};

/// The Redis ledger.
pub struct RedisLedger {
    client: Client,
    connections: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
    prefix: String,
    apply: Script,
    record: Script,
    used: Script,
    release: Script,
    restore: Script,
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError(format!("redis: {e}"))
}

impl RedisLedger {
    /// Connects to `url` (`redis://host:port/db`); every key starts with `prefix`.
    pub fn connect(
        url: &str,
        prefix: &str,
        connections: usize,
    ) -> Result<RedisLedger, LedgerError> {
        let client = Client::open(url).map_err(err)?;
        let first = client.get_connection().map_err(err)?;
        let mut pool: Vec<Mutex<Option<Connection>>> = vec![Mutex::new(Some(first))];
        for _ in 1..connections.max(1) {
            pool.push(Mutex::new(None));
        }
        Ok(RedisLedger {
            client,
            connections: pool,
            next: AtomicUsize::new(0),
            prefix: prefix.to_string(),
            apply: Script::new(include_str!("apply.lua")),
            record: Script::new(include_str!("record.lua")),
            used: Script::new(include_str!("used.lua")),
            release: Script::new(include_str!("release.lua")),
            restore: Script::new(include_str!("restore.lua")),
        })
    }

    /// Runs `f` on a pooled connection, reconnecting once if it is broken.
    fn with<T>(
        &self,
        f: impl Fn(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, LedgerError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut slot = self.connections[i].lock();
        for attempt in 0..2 {
            if slot.is_none() {
                *slot = Some(self.client.get_connection().map_err(err)?);
            }
            match f(slot.as_mut().expect("connected above")) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && (e.is_io_error() || e.is_connection_dropped()) => {
                    *slot = None
                }
                Err(e) => return Err(err(e)),
            }
        }
        Err(LedgerError("redis: unreachable".into()))
    }

    /// The Redis key of a counter: the same in every process.
    fn counter(&self, key: &CounterKey<'_>) -> String {
        counter_key(&self.prefix, key)
    }

    /// The key and label of a counter a recorded cost names.
    fn sink_counter(&self, sink: &SpendSink) -> (String, String) {
        let values: Vec<&str> = sink.values.iter().map(String::as_str).collect();
        let key = CounterKey::new(&sink.policy, &sink.rule, &sink.by, values);
        (self.counter(&key), label(&key))
    }

    fn decision(&self, id: u128) -> String {
        format!("{}:d:{id:032x}", self.prefix)
    }

    fn lease(&self, id: u128) -> String {
        format!("{}:l:{id:032x}", self.prefix)
    }
}

/// `<prefix>:c:` and the JSON array of policy, rule and values: the same in every process
/// and every version (instances of two versions share the counters during an upgrade).
/// Written into one buffer: a key is made for every operation of every decision.
fn counter_key(prefix: &str, key: &CounterKey<'_>) -> String {
    let mut text = Vec::with_capacity(prefix.len() + 16 + key.rule.len() * 4);
    text.extend_from_slice(prefix.as_bytes());
    text.extend_from_slice(b":c:");
    let parts = [key.policy, key.rule]
        .into_iter()
        .chain(key.values.iter().copied());
    serde_json::Serializer::new(&mut text)
        .collect_seq(parts)
        .expect("strings serialise");
    String::from_utf8(text).expect("JSON of strings is UTF-8")
}

/// Arguments of a call of apply.lua before the operations, at most per operation, and
/// after them.
const PLAN_HEADER: usize = 3;
const OP_ARGS: usize = 7;
const PLAN_TAIL: usize = 4;

/// A counter's label as JSON: `{"by", "policy", "rule", "values"}`, in the order the
/// labels already stored have (they are read back into `SpendSink`s). Serialised from
/// borrowed parts: a label travels with every spend operation.
#[derive(serde::Serialize)]
struct Label<'a> {
    by: Vec<String>,
    policy: &'a str,
    rule: &'a str,
    values: &'a [&'a str],
}

fn label(key: &CounterKey<'_>) -> String {
    serde_json::to_string(&Label {
        by: key.by.iter().map(ToString::to_string).collect(),
        policy: key.policy,
        rule: key.rule,
        values: key.values.as_slice(),
    })
    .expect("strings serialise")
}

/// Runs a script call (`EVALSHA <hash> …`, built whole in `call`); a script the server
/// no longer has (`NOSCRIPT`: restarted, flushed) is loaded and called again.
fn eval<T: FromRedisValue>(c: &mut Connection, script: &Script, call: &Cmd) -> RedisResult<T> {
    match call.query(c) {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load(c)?;
            call.query(c)
        }
        answer => answer,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Restore for RedisLedger {
    fn restore_spend(
        &self,
        decision: u128,
        sinks: &[SpendSink],
        at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        let (keys, labels): (Vec<String>, Vec<String>) =
            sinks.iter().map(|s| self.sink_counter(s)).unzip();
        let arg = json!({"decision": format!("{decision:032x}"), "at": at, "cost": cost.0.to_string(), "labels": labels}).to_string();
        self.with(|c| {
            let mut inv = self.restore.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.key(self.decision(decision));
            inv.arg(&arg).invoke::<i64>(c)
        })
        .map(|_| ())
    }

    fn restore_spend_day(
        &self,
        sink: &SpendSink,
        last_at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        let (counter, label) = self.sink_counter(sink);
        let day = last_at.div_euclid(Millis::DAY.0);
        let arg = json!({"day": day.to_string(), "at": last_at, "cost": cost.0.to_string(), "labels": [label]}).to_string();
        self.with(|c| {
            self.restore
                .prepare_invoke()
                .key(&counter)
                .arg(&arg)
                .invoke::<i64>(c)
        })
        .map(|_| ())
    }

    fn restore_lease(
        &self,
        id: u128,
        resource: &str,
        subject: &Subject,
        expires_at: Option<i64>,
    ) -> Result<(), LedgerError> {
        let id = format!("{id:032x}");
        let exp = expires_at.unwrap_or(-1);
        let index = format!("{}:lr:{resource}", self.prefix);
        let record = format!("{}:l:{id}", self.prefix);
        let entry = json!({"s": subject, "e": exp}).to_string();
        self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&index)
                .arg(&id)
                .arg(&entry)
                .ignore()
                .cmd("HSETNX")
                .arg(&record)
                .arg("keys")
                .arg("[]")
                .ignore()
                .cmd("HSET")
                .arg(&record)
                .arg("exp")
                .arg(exp)
                .arg("res")
                .arg(resource)
                .ignore()
                .query::<()>(c)
        })
    }
}

impl Ledger for RedisLedger {
    fn apply(&self, plan: &Plan<'_>, mode: Apply) -> Result<OpResults, LedgerError> {
        // The plan travels as flat arguments (see apply.lua), written straight into one
        // command buffer — numbers as they are, no string per argument, no JSON to decode
        // in the script, which runs on Redis's one thread.
        let spends = plan
            .ops
            .iter()
            .any(|op| matches!(op.kind, OpKind::Spend { .. } | OpKind::Forecast { .. }));
        let keys = plan.ops.len() + usize::from(spends) + usize::from(plan.lease.is_some());
        let mut call = Cmd::with_capacity(
            3 + keys + PLAN_HEADER + OP_ARGS * plan.ops.len() + PLAN_TAIL,
            128 * (plan.ops.len() + 1),
        );
        call.arg("EVALSHA").arg(self.apply.get_hash()).arg(keys);
        // A plan of token buckets and fixed windows only (no lease) leaves out what only
        // reservations, sliding windows and leases read.
        let mut rates_only = plan.lease.is_none();
        for op in &plan.ops {
            let mut key = self.counter(&op.key);
            // a bucket's and a fixed window's one string key (see apply.lua)
            match op.kind {
                OpKind::Rate {
                    algorithm: Algorithm::TokenBucket,
                    ..
                } => key.push_str(":b"),
                OpKind::Rate {
                    algorithm: Algorithm::FixedWindow,
                    ..
                } => key.push_str(":w"),
                _ => rates_only = false,
            }
            call.arg(key);
        }
        // the decision record when something spends, the lease record when one is taken
        if spends {
            call.arg(self.decision(plan.decision));
        }
        if let Some(l) = &plan.lease {
            call.arg(self.lease(l.id));
        }
        call.arg(plan.now)
            .arg(u8::from(mode == Apply::Commit))
            .arg(plan.ops.len());
        let optional = |v: Option<i64>| v.map_or_else(String::new, |v| v.to_string());
        for op in &plan.ops {
            let enforcing = u8::from(op.enforcing);
            // type, enforcing, then what the type needs (see apply.lua)
            match &op.kind {
                OpKind::Rate {
                    algorithm,
                    limit,
                    per_ms,
                    burst,
                } => {
                    let kind = match algorithm {
                        Algorithm::TokenBucket => "tb",
                        Algorithm::FixedWindow => "fw",
                        Algorithm::SlidingWindow => "sw",
                    };
                    call.arg(kind)
                        .arg(enforcing)
                        .arg(*limit)
                        .arg(*per_ms)
                        .arg(*burst)
                }
                OpKind::Spend {
                    window_start,
                    window_ms,
                    limit,
                    amount,
                    span_ms,
                } => call
                    .arg("sp")
                    .arg(enforcing)
                    .arg(limit.0)
                    .arg(amount.0)
                    .arg(optional(Some(*window_start).filter(|w| *w != i64::MIN)))
                    .arg(optional(*window_ms))
                    .arg(label(&op.key))
                    .arg(*span_ms),
                OpKind::Forecast {
                    lookback_ms,
                    monthly_budget,
                } => call
                    .arg("fc")
                    .arg(enforcing)
                    .arg(*lookback_ms)
                    .arg(monthly_budget.0)
                    .arg(label(&op.key)),
                OpKind::Lease { max, resource } => call
                    .arg("ls")
                    .arg(enforcing)
                    .arg(*max)
                    .arg(resource)
                    .arg(
                        json!(
                            op.key
                                .by
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                        )
                        .to_string(),
                    )
                    .arg(json!(op.key.values.as_slice()).to_string()),
            };
        }
        if !rates_only {
            call.arg(plan.reservation_ttl_ms)
                .arg(format!("{:032x}", plan.decision))
                .arg(&self.prefix);
            match &plan.lease {
                Some(l) => {
                    let mut lease = json!({"id": format!("{:032x}", l.id), "resource": l.resource, "subject": l.subject});
                    if let Some(e) = l.expires_at {
                        lease["exp"] = json!(e);
                    }
                    call.arg(lease.to_string())
                }
                None => call.arg(""),
            };
        }
        // Four numbers per operation: granted, used, remaining, retry after (-1: none),
        // as one string of them.
        let answer: String = self.with(|c| eval(c, &self.apply, &call))?;
        let flat: Vec<i64> = answer
            .split_ascii_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| LedgerError(format!("redis: apply.lua answered `{answer}`: {e}")))?;
        if flat.len() != 4 * plan.ops.len() {
            return Err(LedgerError(format!(
                "redis: apply.lua answered {} numbers for {} operations",
                flat.len(),
                plan.ops.len()
            )));
        }
        Ok(flat
            .chunks_exact(4)
            .map(|r| OpResult {
                granted: r[0] == 1,
                used: r[1],
                remaining: r[2],
                retry_after_ms: u64::try_from(r[3]).ok(),
            })
            .collect())
    }

    fn spend_used(
        &self,
        key: &CounterKey<'_>,
        window_start: i64,
        now: i64,
    ) -> Result<Micros, LedgerError> {
        let k = self.counter(key);
        let ws = if window_start == i64::MIN {
            "total".to_string()
        } else {
            window_start.to_string()
        };
        let (spent, reserved): (i64, i64) =
            self.with(|c| self.used.key(&k).arg(&ws).arg(now).invoke(c))?;
        Ok(Micros(spent + reserved))
    }

    fn record(
        &self,
        decision: u128,
        cost: Micros,
        _now: i64,
    ) -> Result<RecordOutcome, LedgerError> {
        Ok(self.record_counted(decision, cost)?.0)
    }

    fn release(&self, lease: u128, now: i64) -> Result<bool, LedgerError> {
        let k = self.lease(lease);
        let id = format!("{lease:032x}");
        let live: i64 = self.with(|c| {
            self.release
                .key(&k)
                .arg(&id)
                .arg(now)
                .arg(&self.prefix)
                .invoke(c)
        })?;
        Ok(live == 1)
    }

    fn spend_usage(
        &self,
        filter: Option<(&str, &str)>,
        now: i64,
        window_of: &dyn Fn(&str, &str) -> Option<i64>,
    ) -> Result<Vec<SpendUsage>, LedgerError> {
        let metas = self.keys(&format!("{}:c:*:m", self.prefix))?;
        let mut out = Vec::new();
        for meta in metas {
            let text: Option<String> =
                self.with(|c| redis::cmd("HGET").arg(&meta).arg("label").query(c))?;
            let Some(label) = text.and_then(|t| serde_json::from_str::<Value>(&t).ok()) else {
                continue;
            };
            let (policy, rule) = (
                label["policy"].as_str().unwrap_or_default(),
                label["rule"].as_str().unwrap_or_default(),
            );
            let by: Vec<String> = label["by"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let values: Vec<String> = label["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some((d, v)) = filter
                && !by.iter().zip(&values).any(|(bd, bv)| bd == d && bv == v)
            {
                continue;
            }
            let Some(window_start) = window_of(policy, rule) else {
                continue;
            };
            let counter = meta.trim_end_matches(":m").to_string();
            let ws = if window_start == i64::MIN {
                "total".to_string()
            } else {
                window_start.to_string()
            };
            let (spent, reserved): (i64, i64) =
                self.with(|c| self.used.key(&counter).arg(&ws).arg(now).invoke(c))?;
            let key = if by.is_empty() {
                "*".to_string()
            } else {
                by.iter()
                    .zip(&values)
                    .map(|(d, v)| format!("{d}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push(SpendUsage {
                policy: policy.to_string(),
                rule: rule.to_string(),
                key,
                first_value: values.first().cloned(),
                spent: Micros(spent),
                reserved: Micros(reserved),
            });
        }
        out.sort_by(|a, b| (&a.policy, &a.rule, &a.key).cmp(&(&b.policy, &b.rule, &b.key)));
        Ok(out)
    }
}

impl RedisLedger {
    /// Records a cost and says what it was counted toward: the check's time and the
    /// counters (so the SQL store can keep them and rebuild Redis after a loss).
    pub fn record_counted(
        &self,
        decision: u128,
        cost: Micros,
    ) -> Result<(RecordOutcome, i64, Vec<SpendSink>), LedgerError> {
        let k = self.decision(decision);
        let d = format!("{decision:032x}");
        let reply: Vec<String> =
            self.with(|c| self.record.key(&k).arg(cost.0).arg(&d).invoke(c))?;
        let outcome = match reply.first().map(String::as_str) {
            Some("recorded") => RecordOutcome::Recorded,
            Some("duplicate") => return Ok((RecordOutcome::Duplicate, 0, Vec::new())),
            Some("overflow") => {
                return Err(LedgerError(format!(
                    "recording {cost} USD would take a counter's recorded spend past what \
                     Redis holds (about 9.2 trillion dollars); nothing was recorded"
                )));
            }
            _ => return Ok((RecordOutcome::UnknownDecision, 0, Vec::new())),
        };
        let at = reply
            .get(1)
            .and_then(|a| a.parse::<f64>().ok())
            .unwrap_or(0.0) as i64;
        let sinks = reply[2..]
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|l| SpendSink {
                policy: l["policy"].as_str().unwrap_or_default().to_string(),
                rule: l["rule"].as_str().unwrap_or_default().to_string(),
                by: strings(&l["by"])
                    .iter()
                    .filter_map(|d| Dimension::parse(d))
                    .collect(),
                values: strings(&l["values"]),
            })
            .collect();
        Ok((outcome, at, sinks))
    }

    /// Whether Redis still holds this ledger's data (a marker set after every rebuild).
    pub fn is_alive(&self) -> Result<bool, LedgerError> {
        let k = format!("{}:alive", self.prefix);
        self.with(|c| redis::cmd("EXISTS").arg(&k).query::<i64>(c))
            .map(|n| n == 1)
    }

    /// Marks the data as complete (after a rebuild, or on a first start).
    pub fn mark_alive(&self) -> Result<(), LedgerError> {
        let k = format!("{}:alive", self.prefix);
        self.with(|c| redis::cmd("SET").arg(&k).arg(1).query::<()>(c))
    }

    /// Takes the rebuild lock for a minute, so one instance rebuilds.
    pub fn try_lock_rebuild(&self) -> Result<bool, LedgerError> {
        let k = format!("{}:rebuilding", self.prefix);
        self.with(|c| {
            redis::cmd("SET")
                .arg(&k)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query::<Option<String>>(c)
        })
        .map(|r| r.is_some())
    }

    /// Every key matching `pattern` (SCAN, never KEYS).
    fn keys(&self, pattern: &str) -> Result<Vec<String>, LedgerError> {
        self.with(|c| {
            let iter: redis::Iter<'_, String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter(c)?;
            iter.collect::<redis::RedisResult<Vec<String>>>()
        })
    }

    /// Deletes every key under this ledger's prefix (tests, or starting over).
    pub fn delete_all(&self) -> Result<u64, LedgerError> {
        let keys = self.keys(&format!("{}:*", self.prefix))?;
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            deleted += self.with(|c| redis::cmd("DEL").arg(chunk).query::<u64>(c))?;
        }
        Ok(deleted)
    }

    /// Whether Redis answers (`/readyz`).
    pub fn ping(&self) -> Result<(), LedgerError> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use tollgate::ledger::CounterKey;
    use tollgate::request::Dimension;

    /// Labels already stored in Redis were written as a `json!` object (keys sorted):
    /// the serialised struct must read alike.
    #[test]
    fn a_label_reads_as_the_labels_already_stored() {
        let by = [
            Dimension::parse("user").unwrap(),
            Dimension::parse("labels.plan").unwrap(),
        ];
        let key = CounterKey::new("p", "r\"1", &by, vec!["u 1", "pro"]);
        let stored = serde_json::json!({
            "policy": "p", "rule": "r\"1", "by": ["user", "labels.plan"], "values": ["u 1", "pro"],
        })
        .to_string();
        assert_eq!(super::label(&key), stored);
    }

    /// Counters already in Redis keep their names (written by earlier versions as
    /// `format!("{prefix}:c:{}", serde_json::to_string(&parts))`).
    #[test]
    fn counter_keys_keep_their_names() {
        let by = [Dimension::parse("user").unwrap()];
        let key = CounterKey::new("p", "r\"1", &by, vec!["u 1 é"]);
        assert_eq!(
            super::counter_key("tollgate", &key),
            r#"tollgate:c:["p","r\"1","u 1 é"]"#
        );
        let shared = CounterKey::new("p", "all", &[], Vec::<&str>::new());
        assert_eq!(super::counter_key("t", &shared), r#"t:c:["p","all"]"#);
    }
}
