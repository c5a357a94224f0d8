//! The state side: one trait that applies a whole plan atomically.
//!
//! The evaluator never reads-then-writes a counter. It builds a [`Plan`] — one operation
//! per stateful rule that applies — and a [`Ledger`] answers each operation and commits
//! all of them or none. Every backend implements the same trait and passes the same
//! conformance tests (`tests/ledger_conformance.rs`).

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::LazyLock;

use smallvec::SmallVec;

use crate::money::Micros;
use crate::request::{Dimension, Subject};

mod head_queue;
mod memory;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use memory::{MemoryLedger, PendingRecord, SpendSink};

/// The values of a counter's `by` dimensions in one request (rarely more than two).
pub type KeyValues<'a> = SmallVec<[&'a str; 2]>;

/// Identifies one counter: a policy, a rule id and the values of its `by` dimensions.
///
/// The `id` is a 128-bit hash of those parts, computed without formatting a string per
/// request; the parts are kept (borrowed) so a backend can label a new counter once.
#[derive(Clone, Debug)]
pub struct CounterKey<'a> {
    /// Hash of (policy, rule, values).
    pub id: u128,
    /// The policy that defines the rule (or `run` for run budgets).
    pub policy: &'a str,
    /// The rule id (or the run id).
    pub rule: &'a str,
    /// The dimensions the counter is keyed by.
    pub by: &'a [Dimension],
    /// Their values in this request, in the order of `by`.
    pub values: KeyValues<'a>,
}

/// The hash of a counter's policy and rule: a rule computes it once, so a check hashes
/// only the request's values ([`ValuesHash`]), once for every rule keyed by them.
///
/// An id is the prefix XOR the values' hash, in two halves: the high half from SipHash
/// under a per-process random key, so that ids cannot be chosen by whoever picks user
/// names (two counters share an id only if the keyed hashes of their values differ by
/// exactly the keyed difference of their rules), and the low half from a fast hash.
#[derive(Clone, Copy)]
pub struct KeyPrefix {
    keyed: u64,
    fast: u64,
}

/// The low bits of a counter id that depend on its values only (see [`KeyPrefix::new`]).
pub const SUBJECT_MASK: u64 = 0xff;

/// The hash of a request's values for a counter's `by` dimensions (see [`KeyPrefix`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValuesHash {
    keyed: u64,
    fast: u64,
}

static KEYED: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// Both hashes of `parts`; each `str` is written with a terminator, so parts cannot run
/// together, after `domain`, so that a rule's values that repeat its own policy and id
/// do not cancel its prefix out.
fn hash_parts(domain: u8, parts: &[&str]) -> (u64, u64) {
    let (mut keyed, mut fast) = (KEYED.build_hasher(), rustc_hash::FxHasher::default());
    keyed.write_u8(domain);
    fast.write_u8(domain);
    for part in parts {
        part.hash(&mut keyed);
        part.hash(&mut fast);
    }
    (keyed.finish(), fast.finish())
}

impl ValuesHash {
    /// The hash of these values, in the order of their dimensions.
    pub fn of(values: &[&str]) -> ValuesHash {
        // A counter every request shares (no `by`) is common: its hash is kept.
        static NONE: LazyLock<ValuesHash> = LazyLock::new(|| ValuesHash::hash(&[]));
        if values.is_empty() {
            *NONE
        } else {
            ValuesHash::hash(values)
        }
    }

    fn hash(values: &[&str]) -> ValuesHash {
        let (keyed, fast) = hash_parts(1, values);
        ValuesHash { keyed, fast }
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPrefix")
    }
}

impl KeyPrefix {
    /// The prefix of every counter of `policy`'s rule `rule`.
    pub fn new(policy: &str, rule: &str) -> KeyPrefix {
        let (keyed, fast) = hash_parts(0, &[policy, rule]);
        // The id's low bits are then the values' own: every counter of one subject (a
        // user's rate, budget and quota) has the same low bits, so a backend that shards
        // by them finds all of a subject's counters behind one lock.
        KeyPrefix {
            keyed,
            fast: fast & !SUBJECT_MASK,
        }
    }

    /// The id of this rule's counter for `values`.
    pub fn id(&self, values: &[&str]) -> u128 {
        self.id_of(ValuesHash::of(values))
    }

    /// The id of this rule's counter for values hashed already.
    pub fn id_of(&self, values: ValuesHash) -> u128 {
        (u128::from(self.keyed ^ values.keyed) << 64) | u128::from(self.fast ^ values.fast)
    }
}

impl<'a> CounterKey<'a> {
    /// Builds a key and its id.
    pub fn new(
        policy: &'a str,
        rule: &'a str,
        by: &'a [Dimension],
        values: impl Into<KeyValues<'a>>,
    ) -> Self {
        let values = values.into();
        CounterKey::with_prefix(&KeyPrefix::new(policy, rule), policy, rule, by, values)
    }

    /// Builds a key whose policy and rule were hashed in advance into `prefix`.
    pub fn with_prefix(
        prefix: &KeyPrefix,
        policy: &'a str,
        rule: &'a str,
        by: &'a [Dimension],
        values: KeyValues<'a>,
    ) -> Self {
        let hash = ValuesHash::of(&values);
        CounterKey::with_hashes(prefix, hash, policy, rule, by, values)
    }

    /// Builds a key from its rule's prefix and its values' hash, both computed already.
    pub fn with_hashes(
        prefix: &KeyPrefix,
        hash: ValuesHash,
        policy: &'a str,
        rule: &'a str,
        by: &'a [Dimension],
        values: KeyValues<'a>,
    ) -> Self {
        CounterKey {
            id: prefix.id_of(hash),
            policy,
            rule,
            by,
            values,
        }
    }

    /// `user=u42,team=t` (or `*` for a counter shared by every request).
    pub fn label(&self) -> String {
        label_text(self.by, &self.values)
    }
}

/// `user=u42,team=t` for these dimensions and values (`*` when there are none).
pub(crate) fn label_text(by: &[Dimension], values: &[impl AsRef<str>]) -> String {
    if by.is_empty() {
        return "*".to_string();
    }
    by.iter()
        .zip(values)
        .map(|(d, v)| format!("{d}={}", v.as_ref()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A rate limiting algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Starts full at `burst`, refills continuously at `limit / per`.
    TokenBucket,
    /// Windows aligned to multiples of `per` since the Unix epoch.
    FixedWindow,
    /// Exact: counts admitted requests with timestamp `>= now - per`.
    SlidingWindow,
}

/// What one operation asks of the ledger.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// Take one request from a rate limit.
    Rate {
        /// The algorithm.
        algorithm: Algorithm,
        /// Requests per `per_ms`.
        limit: u64,
        /// The period, in milliseconds.
        per_ms: i64,
        /// Token bucket capacity.
        burst: u64,
    },
    /// Reserve `amount` against spend since `window_start` (inclusive).
    ///
    /// Refused when `used >= limit` or `used + amount > limit`, where `used` is recorded
    /// spend plus live reservations, each attributed to the time of its check.
    Spend {
        /// Start of the period or trailing window (`i64::MIN` for `total`).
        window_start: i64,
        /// How long after its check an amount can still count: the trailing window, or
        /// the longest calendar period; `None` for `total`. Also gives `retry_after_ms`
        /// for trailing windows.
        window_ms: Option<i64>,
        /// The limit.
        limit: Micros,
        /// The estimate to reserve.
        amount: Micros,
        /// Recorded spend whose check times fall in one span of this many milliseconds
        /// (aligned to the epoch) is one and the same to every window of this counter: a
        /// UTC day for calendar periods and `total` (their windows start at midnight), one
        /// millisecond for trailing windows. A ledger may keep such spend as one sum, at
        /// the latest of its times, so that what a counter holds grows with the days of
        /// its period, not with its calls.
        span_ms: i64,
    },
    /// Read recorded spend in the trailing `lookback_ms` and refuse when the 30-day
    /// projection reaches `monthly_budget`. Reserves nothing; the decision's recorded
    /// cost is added to this counter.
    Forecast {
        /// The trailing window.
        lookback_ms: i64,
        /// The monthly budget the projection is compared with.
        monthly_budget: Micros,
    },
    /// Take a lease slot: refused when the live leases of this key are `>= max`.
    Lease {
        /// The resource.
        resource: String,
        /// The cap.
        max: u64,
    },
}

/// One operation of a plan.
#[derive(Clone, Debug)]
pub struct Op<'a> {
    /// The counter.
    pub key: CounterKey<'a>,
    /// What to do.
    pub kind: OpKind,
    /// Whether a refusal blocks the whole plan (enforce mode). A refused non-enforcing
    /// operation still commits what it can: a budget reserves, an empty bucket stays empty.
    pub enforcing: bool,
}

/// A lease to create when the plan commits (every allowed `acquire`).
#[derive(Clone, Debug)]
pub struct NewLease<'a> {
    /// The lease id.
    pub id: u128,
    /// The resource held.
    pub resource: &'a str,
    /// Who holds it.
    pub subject: &'a Subject,
    /// When it lapses on its own, if ever.
    pub expires_at: Option<i64>,
}

/// A plan's operations: up to four inline (a decision builds its plan without allocating).
pub type Ops<'a> = SmallVec<[Op<'a>; 4]>;

/// The answers to a plan's operations, in their order: up to four inline.
pub type OpResults = SmallVec<[OpResult; 4]>;

/// Everything one decision asks of the ledger.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// The decision id reservations are held under.
    pub decision: u128,
    /// The time of the check.
    pub now: i64,
    /// How long reservations live.
    pub reservation_ttl_ms: i64,
    /// The operations, in rule order.
    pub ops: Ops<'a>,
    /// A lease to create, for `acquire`.
    pub lease: Option<NewLease<'a>>,
}

/// Apply the plan, or only evaluate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Commit when no enforcing operation is refused; otherwise change nothing.
    Commit,
    /// Change nothing, whatever the answers (a stateless rule already denied).
    DryRun,
}

/// The ledger's answer to one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpResult {
    /// Whether the operation was within its limit.
    pub granted: bool,
    /// The amount in use before this operation: tokens or requests taken, micro-dollars
    /// spent and reserved, the 30-day projection, live leases.
    pub used: i64,
    /// What is left after it (when granted) or now (when refused), never negative.
    pub remaining: i64,
    /// When a refused rate or velocity operation could succeed.
    pub retry_after_ms: Option<u64>,
}

/// The answer to [`Ledger::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    /// The cost was recorded.
    Recorded,
    /// This decision was recorded before; nothing was counted twice.
    Duplicate,
    /// No such decision (unknown, denied, or retained no longer).
    UnknownDecision,
}

/// One spend counter's state, for the usage summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendUsage {
    /// The policy (or `run`).
    pub policy: String,
    /// The rule (or run id).
    pub rule: String,
    /// The counter's label, e.g. `user=u42`.
    pub key: String,
    /// The value of the counter's first `by` dimension (budget `overrides` are keyed by it).
    pub first_value: Option<String>,
    /// Recorded spend since the window start.
    pub spent: Micros,
    /// Live reservations since the window start.
    pub reserved: Micros,
}

/// A backend failed; the decision falls back to the policy's `on_backend_error`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("ledger backend error: {0}")]
pub struct LedgerError(pub String);

/// A ledger that takes back the durable part of its state — live leases and recorded
/// spend — from a store (at start-up, or after the ledger lost its data).
pub trait Restore {
    /// Counts a recorded cost again, at the time of its check. Restoring the same
    /// decision twice must count it once (backends that keep state across restores).
    fn restore_spend(
        &self,
        decision: u128,
        sinks: &[SpendSink],
        at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError>;

    /// Counts one counter's recorded spend of one UTC day again, as one sum at `last_at`,
    /// the latest check time among it (a store keeps such sums for days before
    /// [`Engine::exact_spend_since`](crate::Engine::exact_spend_since)). Restoring the
    /// same counter and day twice must count it once (backends that keep state across
    /// restores).
    fn restore_spend_day(
        &self,
        sink: &SpendSink,
        last_at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError>;

    /// Holds a live lease again; quota counters seed themselves from it.
    fn restore_lease(
        &self,
        id: u128,
        resource: &str,
        subject: &Subject,
        expires_at: Option<i64>,
    ) -> Result<(), LedgerError>;
}

/// The state side of tollgate.
pub trait Ledger: Send + Sync {
    /// Answers every operation of the plan; commits all of them or none (see [`Apply`]).
    fn apply(&self, plan: &Plan<'_>, mode: Apply) -> Result<OpResults, LedgerError>;

    /// Recorded spend plus live reservations of one counter since `window_start`.
    fn spend_used(
        &self,
        key: &CounterKey<'_>,
        window_start: i64,
        now: i64,
    ) -> Result<Micros, LedgerError>;

    /// Replaces a decision's reservations by its actual cost (idempotent by decision).
    fn record(&self, decision: u128, cost: Micros, now: i64) -> Result<RecordOutcome, LedgerError>;

    /// Releases a lease; `false` when there is no such live lease.
    fn release(&self, lease: u128, now: i64) -> Result<bool, LedgerError>;

    /// Spend counters whose key has `dimension=value` (every counter when `None`), with
    /// the spend in the window `window_of(policy, rule)` gives (`None`: skip the counter).
    fn spend_usage(
        &self,
        filter: Option<(&str, &str)>,
        now: i64,
        window_of: &dyn Fn(&str, &str) -> Option<i64>,
    ) -> Result<Vec<SpendUsage>, LedgerError>;
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_ids_tell_rules_and_values_apart() {
        let (a, b) = (KeyPrefix::new("p", "a"), KeyPrefix::new("p", "b"));
        let ids = [
            a.id(&["u1"]),
            a.id(&["u2"]),
            b.id(&["u1"]),
            a.id(&[]),
            b.id(&[]),
            a.id(&["u1", ""]),
            // Parts do not run together across the prefix and the values either.
            KeyPrefix::new("p", "").id(&["a"]),
            KeyPrefix::new("pa", "").id(&[]),
            // Values that repeat the rule's own names do not cancel its prefix out.
            a.id(&["p", "a"]),
            b.id(&["p", "b"]),
        ];
        for (i, x) in ids.iter().enumerate() {
            for y in &ids[i + 1..] {
                assert_ne!(x, y);
            }
        }
        // A key built during a check and one rebuilt from its parts (a record's sinks)
        // have the same id.
        let by = [Dimension::Subject(crate::request::SubjectDim::User)];
        let key = CounterKey::with_hashes(
            &a,
            ValuesHash::of(&["u1"]),
            "p",
            "a",
            &by,
            KeyValues::from_slice(&["u1"]),
        );
        assert_eq!(key.id, a.id(&["u1"]));
        assert_eq!(key.id, CounterKey::new("p", "a", &by, vec!["u1"]).id);
    }
}
