//! The in-memory ledger: the default for the library and the CLI.
//!
//! Counters live in 64 shards, each behind its own lock, keyed by the 128-bit counter id
//! (in each shard, one table for rate and lease counters, one for spend counters).
//! A plan locks the shards its operations touch in index order (so two plans never
//! deadlock), answers every operation, and commits all or nothing before unlocking:
//! unrelated keys do not contend, and a limit holds exactly under any number of threads.
//! Counters whose state has returned to "fresh" (a full bucket, an ended window, spend
//! outside any window) are swept, so memory follows the active keys only.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::head_queue::HeadQueue;
use super::{
    Algorithm, Apply, CounterKey, Ledger, LedgerError, Op, OpKind, OpResult, OpResults, Plan,
    RecordOutcome, Restore, SpendUsage,
};
use crate::money::Micros;
use crate::request::{Dimension, Subject};

const SHARDS: usize = 64;
/// Inserts between sweeps at least (more when a shard is large, so a sweep's cost per
/// insert stays bounded); small in unit tests so that they sweep.
const SWEEP_EVERY: u32 = if cfg!(test) { 64 } else { 4096 };
const DAY_MS: i128 = 86_400_000;

/// One counter's spend. The sums are `i128`: each amount is at most `i64::MAX`
/// micro-dollars, but a counter's sum of them can go past it, and a sum that wrapped
/// round would turn a spent budget into an unspent one. What is reported is clamped to
/// `i64::MAX` ([`clamp`]).
#[derive(Debug, Default, Clone)]
struct Spend {
    /// Recorded spend by check time, sorted: one entry per `span` (at the latest time
    /// recorded in it; several when their sum would not fit one).
    events: VecDeque<(i64, i64)>,
    events_sum: i128,
    /// Spend that fell out of every window but still counts for `total`.
    folded: i128,
    /// Live reservations in the order they were made (so by check time, and by expiry
    /// while the TTL stays the same); recorded ones are zeroed in place.
    reservations: HeadQueue<Reservation>,
    reserved_sum: i128,
    /// The reservations made before `before_start` (a period that turned while they
    /// were live) are the first `before_len` of the queue and sum to `before_sum`: kept
    /// as the queue changes, so a check after a turn does not walk them again.
    before_start: i64,
    before_len: usize,
    before_sum: i128,
    /// Some reservation was made before one ahead of it in the queue (a clock set back):
    /// a record then finds its reservation by a walk, not by bisection, until the queue
    /// empties.
    out_of_order: bool,
    /// The span of time within which recorded spend is one to this counter's windows
    /// (`OpKind::Spend::span_ms`; 0 or 1: exact), as the last operation gave it.
    span: i64,
}

/// Whether two check times fall in the same `span` (aligned to the epoch).
fn same_span(a: i64, b: i64, span: i64) -> bool {
    if span <= 1 {
        a == b
    } else {
        a.div_euclid(span) == b.div_euclid(span)
    }
}

/// 32 bytes: one is kept per budget and unrecorded decision for the reservation TTL.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    /// The decision id's low half (random per engine, so unique among a counter's live
    /// reservations; `at` is compared too).
    decision: u64,
    at: i64,
    amount: i64,
    expires: i64,
}

impl Spend {
    fn recorded_since(&mut self, window_start: i64) -> i128 {
        if window_start == i64::MIN {
            return self.folded + self.events_sum;
        }
        while let Some(&(t, amount)) = self.events.front() {
            if t >= window_start {
                break;
            }
            self.events.pop_front();
            self.events_sum -= i128::from(amount);
            self.folded += i128::from(amount);
        }
        self.events_sum
    }

    fn reserved_since(&mut self, window_start: i64, now: i64) -> i128 {
        // Expire from the front: O(1) amortised. A reservation made under a longer TTL
        // can hold back later ones for a while; that errs on the side of the limit.
        // Recorded ones (zeroed) go as soon as they reach the front.
        while let Some(r) = self.reservations.front() {
            if r.expires > now && r.amount != 0 {
                break;
            }
            self.reserved_sum -= i128::from(r.amount);
            if self.before_len > 0 {
                self.before_len -= 1;
                self.before_sum -= i128::from(r.amount);
            }
            self.reservations.pop_front();
        }
        // Reservations from before the window (a period that just turned) do not count.
        // They lead the queue (it is in check-time order, and a window never starts after
        // now): the prefix only grows while the window start moves forward, so each
        // reservation joins it once; a start that moves back (a clock set back) recounts.
        if window_start != self.before_start {
            if window_start < self.before_start {
                self.before_len = 0;
                self.before_sum = 0;
            }
            self.before_start = window_start;
            while let Some(r) = self.reservations.get(self.before_len) {
                if r.at >= window_start {
                    break;
                }
                self.before_sum += i128::from(r.amount);
                self.before_len += 1;
            }
        }
        self.reserved_sum - self.before_sum
    }

    fn reserve(&mut self, r: Reservation) {
        match self.reservations.back() {
            Some(last) if r.at < last.at => self.out_of_order = true,
            None => self.out_of_order = false,
            _ => {}
        }
        self.reserved_sum += i128::from(r.amount);
        self.reservations.push_back(r);
    }

    /// Drops a decision's reservation. The queue is in check-time order, so the
    /// reservations made at `at` are found by bisection: a record costs O(log n) even on
    /// a counter every request shares (a walk would cost what the counter holds).
    fn unreserve(&mut self, decision: u128, at: i64) {
        let low = decision as u64;
        let matches = |r: &Reservation| r.decision == low && r.at == at;
        let found = if self.out_of_order {
            let last = self.reservations.len().checked_sub(1);
            let from_back = self.reservations.iter().rev().position(matches);
            last.zip(from_back).map(|(last, p)| last - p)
        } else {
            let start = self.reservations.partition_point(|r| r.at < at);
            self.reservations
                .iter_from(start)
                .take_while(|r| r.at == at)
                .position(matches)
                .map(|i| start + i)
        };
        if let Some(i) = found {
            let r = self.reservations.get_mut(i).expect("found above");
            self.reserved_sum -= i128::from(r.amount);
            if i < self.before_len {
                self.before_sum -= i128::from(r.amount);
            }
            r.amount = 0;
        }
    }

    /// Adds recorded spend at check time `at`: into the entry of its span when there is
    /// one (which then stands at the later of the two times, so that a trailing window
    /// that reads it after a policy edit counts it no shorter than it should), else as an
    /// entry of its own. Records arrive in any order, so the span's entry may be before
    /// or after `at`.
    fn add_event(&mut self, at: i64, amount: i64) {
        let span = self.span;
        let i = self.events.partition_point(|&(t, _)| t <= at);
        let events = &mut self.events;
        // The entry before `at`, then the one after it.
        let merged = [i.wrapping_sub(1), i].into_iter().find_map(|j| {
            let (t, sum) = events.get_mut(j)?;
            if !same_span(*t, at, span) {
                return None;
            }
            *sum = sum.checked_add(amount)?;
            *t = (*t).max(at);
            Some(())
        });
        if merged.is_none() {
            self.events.insert(i, (at, amount));
        }
        self.events_sum += i128::from(amount);
    }

    /// Takes the span an operation gives. A wider one (spend restored before any
    /// operation told the counter its window, which leaves it exact) folds the entries
    /// that now share a span; a narrower one (a policy edit from a calendar period to a
    /// trailing window) keeps the entries as they are, each at the latest time it holds.
    fn set_span(&mut self, span: i64) {
        if span == self.span {
            return;
        }
        if span > self.span.max(1) {
            let events = std::mem::take(&mut self.events);
            for (at, amount) in events {
                match self.events.back_mut() {
                    Some((t, sum))
                        if same_span(*t, at, span) && sum.checked_add(amount).is_some() =>
                    {
                        *sum += amount;
                        *t = at;
                    }
                    _ => self.events.push_back((at, amount)),
                }
            }
        }
        self.span = span;
    }

    /// When enough spend leaves the trailing window for `amount` to fit under `limit`.
    fn retry_after(
        &self,
        window_start: i64,
        window_ms: i64,
        now: i64,
        used: i128,
        amount: i64,
        limit: i64,
    ) -> Option<u64> {
        // Both queues are in time order: merge them oldest first and stop as soon as
        // enough has left (a refused check on a busy counter does not sort its window).
        let mut events = self
            .events
            .iter()
            .copied()
            .skip_while(|&(t, _)| t < window_start)
            .peekable();
        let mut reservations = self
            .reservations
            .iter()
            .filter(|r| r.amount > 0 && r.at >= window_start)
            .map(|r| (r.at, r.amount))
            .peekable();
        let mut left = used;
        loop {
            let (t, a) = match (events.peek(), reservations.peek()) {
                (Some(e), Some(r)) if r.0 < e.0 => reservations.next(),
                (Some(_), _) => events.next(),
                (None, _) => reservations.next(),
            }?;
            left -= i128::from(a);
            if left < i128::from(limit) && left + i128::from(amount) <= i128::from(limit) {
                return Some((t + window_ms + 1 - now).max(1) as u64);
            }
        }
    }
}

/// A rate or lease counter's state. Kept to 32 bytes, so that a counter with its id fills
/// one cache line: a sliding window's queue lives behind a box (100,000 users' counters
/// in 192-byte entries missed the cache on every line; `rule_costs`, a rate rule alone ≈
/// 700 → 500 ns a check). Spend counters, larger, are in a table of their own
/// ([`SpendCounter`]).
#[derive(Debug)]
enum State {
    Bucket {
        units: Units,
        last: i64,
    },
    Fixed {
        window: i64,
        count: u64,
    },
    // Boxed, though a `VecDeque` is on the heap already: its 32 bytes beside the tag
    // would make every state 40. (A sliding-window counter so allocates its box when
    // made; a token bucket, the default, still allocates nothing.)
    #[allow(clippy::box_collection)]
    Sliding(Box<VecDeque<i64>>),
    Leases(Vec<(u128, Option<i64>)>),
}

/// A token bucket's content (tokens × `per_ms`, which can pass `i64::MAX`) as an `i128`
/// in two halves: an `i128` field would align the whole counter entry to 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Units {
    high: i64,
    low: u64,
}

impl Units {
    fn new(units: i128) -> Units {
        Units {
            high: (units >> 64) as i64,
            low: units as u64,
        }
    }

    fn get(self) -> i128 {
        (i128::from(self.high) << 64) | i128::from(self.low)
    }
}

// A counter with its id in one cache line (see `State`).
const _: () = assert!(std::mem::size_of::<(u128, Counter)>() == 64);

/// A rate or lease counter (spend counters are [`SpendCounter`]s).
#[derive(Debug)]
struct Counter {
    state: State,
    /// When the state becomes equivalent to a fresh one and may be swept.
    idle_at: i64,
}

impl Counter {
    /// Reads a word from each part of the counter an operation will read (the entry's
    /// line and the front of its queue), so that a plan's cache misses are all under way
    /// before the first operation needs its counter.
    fn touch(&self) -> i64 {
        let state = match &self.state {
            State::Bucket { last, .. } => *last,
            State::Sliding(stamps) => stamps.front().map_or(0, |t| *t),
            _ => 0,
        };
        self.idle_at ^ state
    }
}

/// A budget's, velocity rule's or forecast's counter. Its `Spend` is in the table entry,
/// not behind a box: reading a budget is then one miss after the table's, not two (the
/// box was the last step of a chain that the inline first reservation shortened
/// already). Rate counters keep their 64-byte entries in a table of their own.
#[derive(Debug)]
struct SpendCounter {
    /// What the counter is (the usage summary and records name it).
    label: Arc<Label>,
    /// When the spend is outside every window and no record can reach it: then it may
    /// be swept.
    idle_at: i64,
    spend: Spend,
}

impl SpendCounter {
    fn new(label: Arc<Label>, idle_at: i64) -> SpendCounter {
        SpendCounter {
            label,
            idle_at,
            spend: Spend::default(),
        }
    }

    /// Commits a spend operation's effect: its reservation, if any, and how long the
    /// counter must be kept (past its window, and as long as a record may reach it).
    #[inline(always)]
    fn commit(&mut self, effect: Effect, plan: &Plan<'_>, retain_until: i64) {
        let now = plan.now;
        let horizon = match effect {
            Effect::Reserve { amount, window_ms } => {
                if amount > 0 {
                    self.spend.reserve(Reservation {
                        decision: plan.decision as u64,
                        at: now,
                        amount,
                        expires: now + plan.reservation_ttl_ms,
                    });
                }
                window_ms.map_or(i64::MAX, |w| now.saturating_add(w).saturating_add(1))
            }
            Effect::Sink { window_ms } => now + window_ms + 1,
            _ => unreachable!("only spend effects are committed to a spend counter"),
        };
        self.idle_at = self.idle_at.max(horizon).max(retain_until);
    }

    /// As [`Counter::touch`]: the entry's lines and both ends of its queues.
    fn touch(&self) -> i64 {
        let spend = &self.spend;
        self.idle_at
            ^ spend.before_start
            ^ spend.reservations.front().map_or(0, |r| r.expires)
            ^ spend.reservations.back().map_or(0, |r| r.at)
            ^ spend.events.front().map_or(0, |e| e.0)
    }
}

/// A shard's counters of one kind, by id. An id is a hash already, and its high half is
/// keyed (see [`super::KeyPrefix`]): the table uses that half as its hash, so nothing is
/// hashed again, and nobody who picks user names can pick collisions. Operations find
/// their counter once, by bucket ([`Table::find`]), and reach it again by that bucket
/// while the table is not changed.
struct Table<V>(HashTable<(u128, V)>);

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table(HashTable::new())
    }
}

impl<V> Table<V> {
    fn hash(id: u128) -> u64 {
        (id >> 64) as u64
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The bucket of `id`'s counter.
    fn find(&self, id: u128) -> Option<usize> {
        self.0.find_bucket_index(Self::hash(id), |(k, _)| *k == id)
    }

    /// The counter in `bucket`, found by [`Table::find`] since the table last changed.
    fn at(&self, bucket: usize) -> &V {
        &self
            .0
            .get_bucket(bucket)
            .expect("a bucket found in this table")
            .1
    }

    /// As [`Table::at`], to change the counter.
    fn at_mut(&mut self, bucket: usize) -> &mut V {
        &mut self
            .0
            .get_bucket_mut(bucket)
            .expect("a bucket found in this table")
            .1
    }

    fn get(&self, id: u128) -> Option<&V> {
        self.0
            .find(Self::hash(id), |(k, _)| *k == id)
            .map(|(_, v)| v)
    }

    fn get_mut(&mut self, id: u128) -> Option<&mut V> {
        self.0
            .find_mut(Self::hash(id), |(k, _)| *k == id)
            .map(|(_, v)| v)
    }

    /// Adds a counter for an id the table does not hold.
    fn insert(&mut self, id: u128, value: V) {
        self.0
            .insert_unique(Self::hash(id), (id, value), |(k, _)| Self::hash(*k));
    }

    fn get_or_insert_with(&mut self, id: u128, make: impl FnOnce() -> V) -> &mut V {
        let entry = self
            .0
            .entry(Self::hash(id), |(k, _)| *k == id, |(k, _)| Self::hash(*k))
            .or_insert_with(|| (id, make()));
        &mut entry.into_mut().1
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.0.retain(|(_, v)| keep(v));
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

#[derive(Default)]
struct Shard {
    counters: Table<Counter>,
    spends: Table<SpendCounter>,
    ops: u32,
}

impl Shard {
    /// Sweeps idle counters when enough operations have passed since the last sweep.
    /// Called once a plan has committed, never between its operations: a counter that a
    /// later operation made a moment ago is as idle as a fresh one until it commits.
    fn maybe_sweep(&mut self, now: i64, pace: SweepPace) {
        let due = match pace {
            // A sweep visits every counter of the shard: at most one visit per 8
            // operations.
            SweepPace::BySize => {
                let len = self.counters.len() + self.spends.len();
                SWEEP_EVERY.max(8 * len as u32)
            }
            SweepPace::Every(ops) => ops,
        };
        if self.ops >= due {
            self.ops = 0;
            self.counters.retain(|c| c.idle_at > now);
            self.spends.retain(|c| c.idle_at > now);
        }
    }
}

/// The counters a decision's cost counts toward, by id: a record is kept per decision
/// for up to twice the reservation TTL, so it stays small (labels live on the counters).
type Sinks = SmallVec<[u128; 3]>;

struct DecisionRecord {
    id: u128,
    at: i64,
    sinks: Sinks,
    recorded: bool,
    retain_until: i64,
}

/// A shard's decision records: appended in check order to a ring (so keeping one costs
/// a sequential write, and lapsed ones leave from the front), found by id through a
/// compact index of ring positions — not a map of whole records, which at a steady state
/// of minutes of decisions is rehashed and probed far from the cache.
#[derive(Default)]
struct Decisions {
    records: VecDeque<DecisionRecord>,
    /// The absolute position of `records[0]` (positions only grow).
    first: u64,
    /// Absolute positions of the records in `records`, by the hash of their id.
    index: HashTable<u64>,
}

struct Lease {
    resource: String,
    subject: Subject,
    expires_at: Option<i64>,
    keys: Vec<u128>,
}

/// Runs of this many consecutive decisions of one engine thread share a decision shard.
const RUN_BITS: u32 = 6;

/// A decision's shard. An engine's ids differ from one decision to the next in their low
/// bits (a per-thread counter XOR a constant; see `Engine`), so runs of 64 consecutive
/// decisions of a thread share a shard: its ring's back, where records are appended, stays
/// in the cache, and its front, where lapsed ones leave, is read in order. The bits of the
/// thread's block of ids (bit 20 and up) are mixed in, so that two threads deciding at the
/// same pace do not take turns on one shard.
fn decision_shard(id: u128) -> usize {
    let run = (id as u64) >> RUN_BITS;
    ((run ^ (run >> 14)) as usize) % SHARDS
}

/// The index hash of a decision id: its place among its shard's decisions (the id's low
/// bits without the ones that chose the shard), so that a shard's consecutive decisions
/// sit in nearby buckets and keeping a record and dropping the one that lapsed touch the
/// index where it was touched moments ago, not at random in a table of minutes of
/// decisions. The top bits, the table's tag, are mixed from the whole id so that
/// neighbours tell each other apart without reading their records. Only this ledger's
/// own decisions are inserted, so an id chosen to collide slows only its own lookup.
fn id_hash(id: u128) -> u64 {
    const TAG: u64 = !((1 << 57) - 1);
    const SHARD_BITS: u32 = SHARDS.trailing_zeros();
    let low = id as u64;
    let position = ((low >> (RUN_BITS + SHARD_BITS)) << RUN_BITS) | (low & ((1 << RUN_BITS) - 1));
    let mixed = rustc_hash::FxBuildHasher.hash_one(id);
    (position & !TAG) | (mixed & TAG)
}

/// The record at an absolute position, if the ring (whose front is at `first`) still
/// holds it: a stale position reads as absent.
fn record_at(records: &VecDeque<DecisionRecord>, first: u64, pos: u64) -> Option<&DecisionRecord> {
    records.get(pos.wrapping_sub(first) as usize)
}

impl Decisions {
    fn get_mut(&mut self, id: u128) -> Option<&mut DecisionRecord> {
        let (records, first) = (&self.records, self.first);
        let pos = *self.index.find(id_hash(id), |&p| {
            record_at(records, first, p).is_some_and(|r| r.id == id)
        })?;
        self.records.get_mut((pos - first) as usize)
    }

    /// Keeps a record, after dropping the lapsed ones at the front. A front record that
    /// outlives the new one (a longer TTL then, a clock set back) would hold back the ones
    /// behind it, however long it lives: it moves to the back instead (two at most per
    /// insert), so the ring turns and keeps only about what the retention holds.
    fn insert(&mut self, record: DecisionRecord, now: i64) {
        let mut moves = 0;
        while let Some(front) = self.records.front() {
            let lapsed = front.retain_until <= now;
            if !lapsed && (moves == 2 || front.retain_until <= record.retain_until) {
                break;
            }
            let front = self.records.pop_front().expect("a front record");
            let old = self.first;
            self.first += 1;
            let entry = self.index.find_entry(id_hash(front.id), |&p| p == old);
            if lapsed {
                if let Ok(entry) = entry {
                    entry.remove();
                }
            } else {
                if let Ok(mut entry) = entry {
                    *entry.get_mut() = self.first + self.records.len() as u64;
                }
                self.records.push_back(front);
                moves += 1;
            }
        }
        let hash = id_hash(record.id);
        let pos = self.first + self.records.len() as u64;
        let Decisions {
            records,
            first,
            index,
        } = self;
        let at = |p: u64| record_at(records, *first, p);
        // An id checked twice (only a caller's own ids can repeat) keeps its newest record.
        match index.find_entry(hash, |&p| at(p).is_some_and(|r| r.id == record.id)) {
            Ok(mut entry) => *entry.get_mut() = pos,
            Err(absent) => {
                absent
                    .into_table()
                    .insert_unique(hash, pos, |&p| at(p).map_or(0, |r| id_hash(r.id)));
            }
        }
        self.records.push_back(record);
    }
}

/// A counter a recorded decision's cost counts toward, in portable form (the id is
/// recomputed from these parts when restored, in another process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendSink {
    /// The policy (or `run:<id>`).
    pub policy: String,
    /// The rule id.
    pub rule: String,
    /// The `by` dimensions.
    pub by: Vec<Dimension>,
    /// Their values.
    pub values: Vec<String>,
}

/// A counter keeps what it is (for the usage summary, lease matching and records) as the
/// sink a recorded cost names.
type Label = SpendSink;

impl SpendSink {
    fn of(key: &CounterKey<'_>) -> Arc<SpendSink> {
        Arc::new(SpendSink {
            policy: key.policy.to_string(),
            rule: key.rule.to_string(),
            by: key.by.to_vec(),
            values: key.values.iter().map(|v| v.to_string()).collect(),
        })
    }

    /// The counter id, recomputed from the parts (in another process, too).
    fn id(&self) -> u128 {
        let values: super::KeyValues<'_> = self.values.iter().map(String::as_str).collect();
        super::KeyPrefix::new(&self.policy, &self.rule).id(&values)
    }

    fn has(&self, dimension: &str, value: &str) -> bool {
        self.by
            .iter()
            .zip(&self.values)
            .any(|(d, v)| d.to_string() == dimension && v == value)
    }
}

/// A `record` that has been claimed (so a concurrent duplicate sees it) but not yet
/// applied: the caller makes it durable, then [`MemoryLedger::finish_record`].
#[derive(Clone, Debug)]
pub struct PendingRecord {
    /// The decision.
    pub decision: u128,
    /// The time of its check (spend is attributed to it).
    pub at: i64,
    /// The counters the cost counts toward.
    pub sinks: Vec<SpendSink>,
}

/// The in-memory [`Ledger`].
pub struct MemoryLedger {
    shards: Box<[Mutex<Shard>]>,
    decisions: Box<[Mutex<Decisions>]>,
    leases: Mutex<HashMap<u128, Lease>>,
    sweep: SweepPace,
}

/// When a shard sweeps its idle counters.
#[derive(Clone, Copy)]
enum SweepPace {
    /// After [`SWEEP_EVERY`] operations, or 8 per counter it holds when that is more.
    BySize,
    /// After this many operations, whatever its size.
    Every(u32),
}

impl Default for MemoryLedger {
    fn default() -> Self {
        MemoryLedger::new()
    }
}

impl std::fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryLedger")
    }
}

/// A counter's shard: its id's lowest bits, which depend on its values only, so that one
/// subject's counters (a user's rate and budget) are behind one lock (`rule_costs`, 10
/// rules: ≈ 1.85 → 1.77 µs a check).
fn shard_of(id: u128) -> usize {
    const _: () = assert!(SHARDS.is_power_of_two() && SHARDS as u64 - 1 <= super::SUBJECT_MASK);
    (id as usize) % SHARDS
}

/// What committing one operation changes.
enum Effect {
    None,
    Bucket {
        units: i128,
        last: i64,
        idle_at: i64,
    },
    Fixed {
        window: i64,
        count: u64,
        idle_at: i64,
    },
    SlidingPush {
        idle_at: i64,
    },
    Reserve {
        amount: i64,
        window_ms: Option<i64>,
    },
    Sink {
        window_ms: i64,
    },
    Lease,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> MemoryLedger {
        MemoryLedger {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            decisions: (0..SHARDS)
                .map(|_| Mutex::new(Decisions::default()))
                .collect(),
            leases: Mutex::new(HashMap::new()),
            sweep: SweepPace::BySize,
        }
    }

    /// An empty ledger that sweeps each shard's idle counters every time `ops`
    /// operations have committed in it, whatever its size. By default a shard sweeps
    /// after 4,096 operations, or 8 for each counter it holds when that is more, so that
    /// sweeping costs little; sweeping more often changes nothing a caller can see, and
    /// tests use it to make sweeps fall between everything else (`ops` = 0 sweeps after
    /// every plan).
    pub fn sweeping_every(ops: u32) -> MemoryLedger {
        MemoryLedger {
            sweep: SweepPace::Every(ops),
            ..MemoryLedger::new()
        }
    }

    /// Claims a decision for recording: `Err(Duplicate)` if it was recorded (or is being
    /// recorded), `Err(UnknownDecision)` if there is no such decision.
    pub fn begin_record(&self, decision: u128, now: i64) -> Result<PendingRecord, RecordOutcome> {
        let (at, ids) = {
            let mut decisions = self.decisions[decision_shard(decision)].lock();
            let Some(record) = decisions.get_mut(decision).filter(|r| r.retain_until > now) else {
                return Err(RecordOutcome::UnknownDecision);
            };
            if record.recorded {
                return Err(RecordOutcome::Duplicate);
            }
            record.recorded = true;
            (record.at, record.sinks.clone())
        };
        // The counters outlive the record (see `apply`), so each one's label is there.
        let mut guards = Guards::new();
        self.lock_shards(ids.iter().copied(), &mut guards);
        let sinks = ids
            .iter()
            .filter_map(|id| {
                let label = &guard(&mut guards, *id).spends.get(*id)?.label;
                Some(Label::clone(label))
            })
            .collect();
        Ok(PendingRecord {
            decision,
            at,
            sinks,
        })
    }

    /// Gives a claimed decision back (its durable write failed): it may be recorded again.
    pub fn abort_record(&self, decision: u128) {
        if let Some(r) = self.decisions[decision_shard(decision)]
            .lock()
            .get_mut(decision)
        {
            r.recorded = false;
        }
    }

    /// Applies a claimed record: the reservations go, the cost counts at the check's time.
    pub fn finish_record(&self, pending: &PendingRecord, cost: Micros) {
        self.add_spend(&pending.sinks, Some(pending.decision), pending.at, cost);
    }

    fn add_spend(&self, sinks: &[SpendSink], decision: Option<u128>, at: i64, cost: Micros) {
        let ids: SmallVec<[u128; 4]> = sinks.iter().map(SpendSink::id).collect();
        let mut guards = Guards::new();
        self.lock_shards(ids.iter().copied(), &mut guards);
        for (id, sink) in ids.iter().zip(sinks) {
            let shard = guard(&mut guards, *id);
            // A counter created here (restored spend, or one swept meanwhile) does not know
            // its window yet: it is kept until an operation tells it.
            let counter = shard
                .spends
                .get_or_insert_with(*id, || SpendCounter::new(Arc::new(sink.clone()), i64::MAX));
            if let Some(d) = decision {
                counter.spend.unreserve(d, at);
            }
            if cost.0 != 0 {
                counter.spend.add_event(at, cost.0);
            }
        }
    }

    /// Locks the shards of `ids` into `guards`, in index order (filled in place: a
    /// collected `Guards` was moved out, a `memcpy` per check). The shards are the bits
    /// of one word, so they come out in order and once each without a sort, which was 2%
    /// of a 10-rule check.
    fn lock_shards<'a>(&'a self, ids: impl Iterator<Item = u128>, guards: &mut Guards<'a>) {
        const _: () = assert!(SHARDS <= u64::BITS as usize);
        let mut shards = ids.fold(0u64, |set, id| set | 1 << shard_of(id));
        while shards != 0 {
            let i = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            guards.push((i, self.shards[i].lock()));
        }
    }
}

type Guards<'a> = SmallVec<[(usize, MutexGuard<'a, Shard>); 8]>;

/// Where `id`'s shard is in `guards`.
fn guard_index(guards: &[(usize, MutexGuard<'_, Shard>)], id: u128) -> usize {
    let i = shard_of(id);
    guards
        .iter()
        .position(|(s, _)| *s == i)
        .expect("shard locked")
}

fn guard<'g, 'a>(guards: &'g mut [(usize, MutexGuard<'a, Shard>)], id: u128) -> &'g mut Shard {
    let at = guard_index(guards, id);
    &mut guards[at].1
}

/// Where a plan's operation finds its counter while the plan holds its shards.
struct Slot {
    /// Its shard's place in the plan's guards.
    guard: usize,
    /// Its bucket in the shard's table ([`Table::find`]).
    bucket: usize,
    /// Whether that table is the spend counters'.
    spend: bool,
}

/// A sum of amounts as an amount: `i64::MAX` micro-dollars (9.2 trillion dollars) when it
/// is more (or `i64::MIN` when less), which every limit is exceeded by.
fn clamp(sum: i128) -> i64 {
    sum.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// `n / d` as `i128` division gives it, in 64 bits when both fit: they nearly always do,
/// and a 128-bit division is a call of some 60 instructions (a token bucket makes three
/// a check).
fn quotient(n: i128, d: i128) -> i128 {
    match (u64::try_from(n), u64::try_from(d)) {
        (Ok(n), Ok(d)) if d != 0 => i128::from(n / d),
        _ => n / d,
    }
}

/// Whether an operation's counter holds spend (and so needs its label).
fn spends(kind: &OpKind) -> bool {
    matches!(kind, OpKind::Spend { .. } | OpKind::Forecast { .. })
}

fn fresh_state(kind: &OpKind) -> State {
    match kind {
        OpKind::Rate {
            algorithm: Algorithm::TokenBucket,
            burst,
            per_ms,
            ..
        } => State::Bucket {
            units: Units::new(i128::from(*burst) * i128::from(*per_ms)),
            last: i64::MIN,
        },
        OpKind::Rate {
            algorithm: Algorithm::FixedWindow,
            ..
        } => State::Fixed {
            window: i64::MIN,
            count: 0,
        },
        OpKind::Rate {
            algorithm: Algorithm::SlidingWindow,
            ..
        } => State::Sliding(Box::default()),
        OpKind::Lease { .. } => State::Leases(Vec::new()),
        OpKind::Spend { .. } | OpKind::Forecast { .. } => {
            unreachable!("spend counters are in their own table")
        }
    }
}

fn state_fits(state: &State, kind: &OpKind) -> bool {
    matches!(
        (state, kind),
        (
            State::Bucket { .. },
            OpKind::Rate {
                algorithm: Algorithm::TokenBucket,
                ..
            }
        ) | (
            State::Fixed { .. },
            OpKind::Rate {
                algorithm: Algorithm::FixedWindow,
                ..
            }
        ) | (
            State::Sliding(_),
            OpKind::Rate {
                algorithm: Algorithm::SlidingWindow,
                ..
            }
        ) | (State::Leases(_), OpKind::Lease { .. })
    )
}

/// Live leases that a new lease counter must start from (its key was never seen, or swept).
fn seed_leases(
    leases: &HashMap<u128, Lease>,
    key: &CounterKey<'_>,
    resource: &str,
    now: i64,
) -> Vec<(u128, Option<i64>)> {
    leases
        .iter()
        .filter(|(_, l)| l.resource == resource && l.expires_at.is_none_or(|e| e > now))
        .filter(|(_, l)| {
            key.by.iter().zip(&key.values).all(|(d, v)| match d {
                Dimension::Subject(s) => l.subject.get(*s) == Some(*v),
                Dimension::Resource => l.resource == *v,
                _ => false,
            })
        })
        .map(|(id, l)| (*id, l.expires_at))
        .collect()
}

/// Answers a spend or forecast operation on its counter's spend.
fn evaluate_spend(spend: &mut Spend, op: &Op<'_>, now: i64) -> (OpResult, Effect) {
    match &op.kind {
        OpKind::Spend {
            window_start,
            window_ms,
            limit,
            amount,
            span_ms,
        } => {
            spend.set_span(*span_ms);
            let used =
                spend.recorded_since(*window_start) + spend.reserved_since(*window_start, now);
            let refused = crate::rules::budget::exceeds(Micros(clamp(used)), *amount, *limit);
            // A refused non-enforcing operation still reserves when the plan commits.
            let reserves = !refused || !op.enforcing;
            let reserved = if reserves { amount.0 } else { 0 };
            let remaining = clamp(i128::from(limit.0) - used - i128::from(reserved)).max(0);
            let retry_after_ms = match window_ms {
                Some(w) if refused && *window_start != i64::MIN => {
                    spend.retry_after(*window_start, *w, now, used, amount.0, limit.0)
                }
                _ => None,
            };
            (
                OpResult {
                    granted: !refused,
                    used: clamp(used),
                    remaining,
                    retry_after_ms,
                },
                Effect::Reserve {
                    amount: amount.0,
                    window_ms: *window_ms,
                },
            )
        }
        OpKind::Forecast {
            lookback_ms,
            monthly_budget,
        } => {
            spend.set_span(1);
            let spent = spend.recorded_since(now - lookback_ms);
            let lookback = i128::from(*lookback_ms);
            // projected = spent / (lookback in days) * 30, compared without rounding.
            let granted = spent * 30 * DAY_MS < i128::from(monthly_budget.0) * lookback;
            let projected = quotient(spent * 30 * DAY_MS, lookback) as i64;
            (
                OpResult {
                    granted,
                    used: projected,
                    remaining: (monthly_budget.0 - projected).max(0),
                    retry_after_ms: None,
                },
                Effect::Sink {
                    window_ms: *lookback_ms,
                },
            )
        }
        OpKind::Rate { .. } | OpKind::Lease { .. } => {
            unreachable!("only spend operations have spend counters")
        }
    }
}

fn evaluate(counter: &mut Counter, op: &Op<'_>, now: i64) -> (OpResult, Effect) {
    match (&mut counter.state, &op.kind) {
        (
            State::Bucket { units, last },
            OpKind::Rate {
                limit,
                per_ms,
                burst,
                ..
            },
        ) => {
            let capacity = i128::from(*burst) * i128::from(*per_ms);
            let cost = i128::from(*per_ms);
            let rate = i128::from(*limit);
            let elapsed = if *last == i64::MIN {
                0
            } else {
                i128::from((now - *last).max(0))
            };
            let current = (units.get() + elapsed * rate).min(capacity);
            let used = quotient(capacity - current, cost) as i64;
            if current >= cost {
                let after = current - cost;
                let idle_at = now + quotient(capacity - after + rate - 1, rate) as i64;
                (
                    OpResult {
                        granted: true,
                        used,
                        remaining: quotient(after, cost) as i64,
                        retry_after_ms: None,
                    },
                    Effect::Bucket {
                        units: after,
                        last: now,
                        idle_at,
                    },
                )
            } else {
                let wait = quotient(cost - current + rate - 1, rate) as u64;
                (
                    OpResult {
                        granted: false,
                        used,
                        remaining: 0,
                        retry_after_ms: Some(wait.max(1)),
                    },
                    Effect::None,
                )
            }
        }
        (State::Fixed { window, count }, OpKind::Rate { limit, per_ms, .. }) => {
            let current = now.div_euclid(*per_ms);
            let taken = if *window == current { *count } else { 0 };
            let end = (current + 1) * per_ms;
            if taken < *limit {
                (
                    OpResult {
                        granted: true,
                        used: taken as i64,
                        remaining: (*limit - taken - 1) as i64,
                        retry_after_ms: None,
                    },
                    Effect::Fixed {
                        window: current,
                        count: taken + 1,
                        idle_at: end,
                    },
                )
            } else {
                (
                    OpResult {
                        granted: false,
                        used: taken as i64,
                        remaining: 0,
                        retry_after_ms: Some(((end - now) as u64).max(1)),
                    },
                    Effect::None,
                )
            }
        }
        (State::Sliding(stamps), OpKind::Rate { limit, per_ms, .. }) => {
            while stamps.front().is_some_and(|&t| t < now - per_ms) {
                stamps.pop_front();
            }
            let taken = stamps.len() as u64;
            if taken < *limit {
                (
                    OpResult {
                        granted: true,
                        used: taken as i64,
                        remaining: (*limit - taken - 1) as i64,
                        retry_after_ms: None,
                    },
                    Effect::SlidingPush {
                        idle_at: now + per_ms + 1,
                    },
                )
            } else {
                let oldest = stamps.front().copied().unwrap_or(now);
                (
                    OpResult {
                        granted: false,
                        used: taken as i64,
                        remaining: 0,
                        retry_after_ms: Some(((oldest + per_ms - now + 1) as u64).max(1)),
                    },
                    Effect::None,
                )
            }
        }
        (State::Leases(live), OpKind::Lease { max, .. }) => {
            live.retain(|(_, e)| e.is_none_or(|e| e > now));
            let n = live.len() as u64;
            let granted = n < *max;
            (
                OpResult {
                    granted,
                    used: n as i64,
                    remaining: max.saturating_sub(n + u64::from(granted)) as i64,
                    retry_after_ms: None,
                },
                Effect::Lease,
            )
        }
        _ => unreachable!("state_fits checked the state"),
    }
}

/// Restores once, at start-up (a fresh in-memory ledger has nothing to double count).
impl Restore for MemoryLedger {
    fn restore_spend(
        &self,
        _decision: u128,
        sinks: &[SpendSink],
        at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        self.add_spend(sinks, None, at, cost);
        Ok(())
    }

    fn restore_spend_day(
        &self,
        sink: &SpendSink,
        last_at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        self.add_spend(std::slice::from_ref(sink), None, last_at, cost);
        Ok(())
    }

    fn restore_lease(
        &self,
        id: u128,
        resource: &str,
        subject: &Subject,
        expires_at: Option<i64>,
    ) -> Result<(), LedgerError> {
        self.leases.lock().insert(
            id,
            Lease {
                resource: resource.to_string(),
                subject: subject.clone(),
                expires_at,
                keys: Vec::new(),
            },
        );
        Ok(())
    }
}

impl Ledger for MemoryLedger {
    fn apply(&self, plan: &Plan<'_>, mode: Apply) -> Result<OpResults, LedgerError> {
        let now = plan.now;
        // Slices, taken once: each access through a `SmallVec` checks where it is stored.
        let ops: &[Op<'_>] = &plan.ops;
        let needs_leases =
            plan.lease.is_some() || ops.iter().any(|o| matches!(o.kind, OpKind::Lease { .. }));
        let mut lease_table = needs_leases.then(|| self.leases.lock());
        let mut guards = Guards::new();
        self.lock_shards(ops.iter().map(|o| o.key.id), &mut guards);
        let locked: &mut [(usize, MutexGuard<'_, Shard>)] = &mut guards;

        // Find every counter (making the missing ones), and read each part of it an
        // operation will read, before evaluating any: the reads do not depend on each
        // other, so their cache misses overlap instead of following one another. Only
        // their effect on the cache is wanted; `black_box` keeps them from being dropped.
        // Reading the whole counter, not only its key: `rule_costs` 10 rules ≈ 1.76 →
        // 1.54 µs a check. Each operation keeps where its counter is, so that evaluating
        // and committing it do not look it up again (one lookup where there were three).
        let mut slots: SmallVec<[Slot; 8]> = SmallVec::with_capacity(ops.len());
        let mut seeded: Vec<(u128, Vec<u128>)> = Vec::new();
        let mut made = false;
        let mut seen = 0i64;
        for op in ops {
            let at = guard_index(locked, op.key.id);
            let shard = &mut *locked[at].1;
            let spend = spends(&op.kind);
            let bucket = if spend {
                shard.spends.find(op.key.id).inspect(|&b| {
                    seen ^= shard.spends.at(b).touch();
                })
            } else {
                shard.counters.find(op.key.id).inspect(|&b| {
                    seen ^= shard.counters.at(b).touch();
                })
            };
            let bucket = bucket.unwrap_or_else(|| {
                made = true;
                if spend {
                    let counter = SpendCounter::new(SpendSink::of(&op.key), now);
                    shard.spends.insert(op.key.id, counter);
                } else {
                    let state = match (&op.kind, &lease_table) {
                        (OpKind::Lease { resource, .. }, Some(table)) => {
                            let live = seed_leases(table, &op.key, resource, now);
                            seeded.push((op.key.id, live.iter().map(|(id, _)| *id).collect()));
                            State::Leases(live)
                        }
                        _ => fresh_state(&op.kind),
                    };
                    let counter = Counter {
                        state,
                        idle_at: now,
                    };
                    shard.counters.insert(op.key.id, counter);
                }
                usize::MAX
            });
            slots.push(Slot {
                guard: at,
                bucket,
                spend,
            });
        }
        std::hint::black_box(seen);
        if made {
            // Adding a counter may have moved its table's others: find them all again.
            for (op, slot) in ops.iter().zip(slots.iter_mut()) {
                let shard = &locked[slot.guard].1;
                slot.bucket = if slot.spend {
                    shard.spends.find(op.key.id)
                } else {
                    shard.counters.find(op.key.id)
                }
                .expect("made above");
            }
        }

        let mut results = OpResults::with_capacity(ops.len());
        let mut effects: SmallVec<[Effect; 8]> = SmallVec::new();
        for (op, slot) in ops.iter().zip(&slots) {
            let shard = &mut *locked[slot.guard].1;
            let (result, effect) = if slot.spend {
                evaluate_spend(&mut shard.spends.at_mut(slot.bucket).spend, op, now)
            } else {
                let counter = shard.counters.at_mut(slot.bucket);
                if !state_fits(&counter.state, &op.kind) {
                    // The rule changed type or algorithm under the same id: start afresh.
                    counter.state = fresh_state(&op.kind);
                }
                evaluate(counter, op, now)
            };
            results.push(result);
            effects.push(effect);
        }
        // A seeded counter now holds those leases: releasing one must update it too.
        if let Some(table) = lease_table.as_mut() {
            for (counter, ids) in seeded {
                for id in ids {
                    if let Some(lease) = table.get_mut(&id) {
                        lease.keys.push(counter);
                    }
                }
            }
        }
        let blocked = ops
            .iter()
            .zip(&results)
            .any(|(op, r)| op.enforcing && !r.granted);
        if mode == Apply::DryRun || blocked {
            return Ok(results);
        }

        let mut sinks = Sinks::new();
        // A late `record` (after the reservation lapsed) still counts for as long again;
        // the counters it counts toward live at least as long as its decision record.
        let retain_until = now + 2 * plan.reservation_ttl_ms.max(60_000);
        let mut lease_keys = Vec::new();
        // Drained, not consumed: a consumed `SmallVec` is moved into its iterator.
        let committed = ops.iter().zip(&slots).zip(&results);
        for (((op, slot), result), effect) in committed.zip(effects.drain(..)) {
            let shard = &mut *locked[slot.guard].1;
            shard.ops += 1;
            if slot.spend {
                shard
                    .spends
                    .at_mut(slot.bucket)
                    .commit(effect, plan, retain_until);
                sinks.push(op.key.id);
                continue;
            }
            let counter = shard.counters.at_mut(slot.bucket);
            match (effect, &mut counter.state) {
                (
                    Effect::Bucket {
                        units: u,
                        last: l,
                        idle_at,
                    },
                    State::Bucket { units, last },
                ) => {
                    *units = Units::new(u);
                    *last = l;
                    counter.idle_at = idle_at;
                }
                (
                    Effect::Fixed {
                        window: w,
                        count: c,
                        idle_at,
                    },
                    State::Fixed { window, count },
                ) => {
                    *window = w;
                    *count = c;
                    counter.idle_at = idle_at;
                }
                (Effect::SlidingPush { idle_at }, State::Sliding(stamps)) => {
                    stamps.push_back(now);
                    counter.idle_at = idle_at;
                }
                (Effect::Lease, State::Leases(live)) => {
                    if let Some(lease) = &plan.lease
                        && result.granted | !op.enforcing
                    {
                        live.push((lease.id, lease.expires_at));
                        lease_keys.push(op.key.id);
                    }
                    // Idle once the last lease lapses (never, while one has no TTL).
                    counter.idle_at = live
                        .iter()
                        .map(|(_, e)| e.unwrap_or(i64::MAX))
                        .max()
                        .unwrap_or(now);
                }
                _ => {}
            }
        }
        // Only now: a sweep would move the counters that `slots` point at, and take the
        // ones made for this plan (fresh, so idle) before they commit.
        for (_, shard) in locked.iter_mut() {
            shard.maybe_sweep(now, self.sweep);
        }
        if let (Some(lease), Some(table)) = (&plan.lease, lease_table.as_mut()) {
            table.insert(
                lease.id,
                Lease {
                    resource: lease.resource.to_string(),
                    subject: lease.subject.clone(),
                    expires_at: lease.expires_at,
                    keys: lease_keys,
                },
            );
        }
        drop(guards);
        drop(lease_table);
        if !sinks.is_empty() {
            self.decisions[decision_shard(plan.decision)].lock().insert(
                DecisionRecord {
                    id: plan.decision,
                    at: now,
                    sinks,
                    recorded: false,
                    retain_until,
                },
                now,
            );
        }
        Ok(results)
    }

    fn spend_used(
        &self,
        key: &CounterKey<'_>,
        window_start: i64,
        now: i64,
    ) -> Result<Micros, LedgerError> {
        let mut shard = self.shards[shard_of(key.id)].lock();
        Ok(match shard.spends.get_mut(key.id) {
            Some(SpendCounter { spend, .. }) => Micros(clamp(
                spend.recorded_since(window_start) + spend.reserved_since(window_start, now),
            )),
            None => Micros::ZERO,
        })
    }

    fn record(&self, decision: u128, cost: Micros, now: i64) -> Result<RecordOutcome, LedgerError> {
        match self.begin_record(decision, now) {
            Ok(pending) => {
                self.finish_record(&pending, cost);
                Ok(RecordOutcome::Recorded)
            }
            Err(outcome) => Ok(outcome),
        }
    }

    fn release(&self, lease: u128, now: i64) -> Result<bool, LedgerError> {
        let mut table = self.leases.lock();
        let Some(l) = table.remove(&lease) else {
            return Ok(false);
        };
        let mut guards = Guards::new();
        self.lock_shards(l.keys.iter().copied(), &mut guards);
        for id in &l.keys {
            let shard = guard(&mut guards, *id);
            if let Some(Counter {
                state: State::Leases(live),
                idle_at,
                ..
            }) = shard.counters.get_mut(*id)
            {
                live.retain(|(lid, _)| *lid != lease);
                if live.is_empty() {
                    *idle_at = now;
                }
            }
        }
        Ok(l.expires_at.is_none_or(|e| e > now))
    }

    fn spend_usage(
        &self,
        filter: Option<(&str, &str)>,
        now: i64,
        window_of: &dyn Fn(&str, &str) -> Option<i64>,
    ) -> Result<Vec<SpendUsage>, LedgerError> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for SpendCounter { label, spend, .. } in shard.spends.values_mut() {
                if filter.is_some_and(|(d, v)| !label.has(d, v)) {
                    continue;
                }
                let Some(window_start) = window_of(&label.policy, &label.rule) else {
                    continue;
                };
                out.push(SpendUsage {
                    policy: label.policy.clone(),
                    rule: label.rule.clone(),
                    key: super::label_text(&label.by, &label.values),
                    first_value: label.values.first().cloned(),
                    spent: Micros(clamp(spend.recorded_since(window_start))),
                    reserved: Micros(clamp(spend.reserved_since(window_start, now))),
                });
            }
        }
        out.sort_by(|a, b| (&a.policy, &a.rule, &a.key).cmp(&(&b.policy, &b.rule, &b.key)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{DecisionRecord, Decisions, MemoryLedger, Reservation, Sinks, Spend, SpendSink};
    use crate::decision::Remaining;
    use crate::{Engine, ManualClock, Micros, RecordOutcome, Request};

    impl MemoryLedger {
        fn decision_records(&self) -> usize {
            self.decisions.iter().map(|d| d.lock().records.len()).sum()
        }

        /// Rate and lease counters, then spend counters, over every shard.
        fn counter_counts(&self) -> (usize, usize) {
            self.shards.iter().fold((0, 0), |(c, s), shard| {
                let shard = shard.lock();
                (c + shard.counters.len(), s + shard.spends.len())
            })
        }
    }

    #[test]
    fn a_plan_locks_each_of_its_shards_once_in_index_order() {
        let ledger = MemoryLedger::new();
        // Ids in shards 5, 63, 0 and 5 again (a shard is the id's low bits).
        let ids = [5u128, (1 << 64) | 63, 64, (2 << 64) | 5];
        let mut guards = super::Guards::new();
        ledger.lock_shards(ids.into_iter(), &mut guards);
        let locked: Vec<usize> = guards.iter().map(|(i, _)| *i).collect();
        assert_eq!(locked, [0, 5, 63]);
        assert!(
            ledger.shards[63].try_lock().is_none(),
            "held until the guards go"
        );
        drop(guards);
        assert!(ledger.shards[63].try_lock().is_some());
    }

    /// An engine on a memory ledger and a manual clock at 1,000 s.
    fn engine_on(policy: &str) -> (Engine, Arc<ManualClock>, Arc<MemoryLedger>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let ledger = Arc::new(MemoryLedger::new());
        let engine = Engine::builder()
            .clock(clock.clone())
            .ledger(ledger.clone())
            .build_from_text(policy)
            .unwrap();
        (engine, clock, ledger)
    }

    /// Recorded spend entries of every spend counter whose label names `rule`.
    fn events_of(ledger: &MemoryLedger, rule: &str) -> Vec<(i64, i64)> {
        let mut events = Vec::new();
        for shard in &ledger.shards {
            for c in shard.lock().spends.values() {
                if c.label.rule == rule {
                    events.extend(c.spend.events.iter().copied());
                }
            }
        }
        events
    }

    const DAY: i64 = crate::duration::Millis::DAY.0;

    /// A calendar budget keeps one entry of recorded spend a day, however many calls it
    /// records and in whatever order; a trailing window keeps its times exact. Either way
    /// what they report is the exact sum.
    #[test]
    fn calendar_spend_is_kept_by_the_day() {
        let (engine, clock, ledger) = engine_on(
            "policies: [{name: p, rules: [\
             {id: monthly, type: budget, limit_usd: 1000, period: month},\
             {id: hourly, type: budget, limit_usd: 1000, period: 'rolling:1h'}]}]",
        );
        // 2026-03-02T22:00Z, two hours before a midnight the calls cross.
        let start = 1_772_488_800_000;
        clock.set(start);
        let mut request = Request::default();
        request.estimate.cost_usd = Some(Micros(1));
        // Checked in groups of ten (230 s), each recorded newest first: a record often
        // lands before entries already there.
        for group in 0..60 {
            let mut ids = Vec::new();
            for _ in 0..10 {
                clock.advance(23_000);
                let d = engine.check(&request);
                assert!(d.allowed);
                ids.push(d.decision_id.to_string());
            }
            for (i, id) in ids.iter().enumerate().rev() {
                let cost = Micros(1_000 + group * 10 + i as i64);
                assert_eq!(engine.record(id, cost).unwrap(), RecordOutcome::Recorded);
            }
        }
        let monthly = events_of(&ledger, "monthly");
        assert_eq!(
            monthly.len(),
            2,
            "one entry for each of the two days: {monthly:?}"
        );
        let last_of_first_day = start + 23_000 * ((2 * 3_600_000) / 23_000);
        assert_eq!(
            monthly[0].0, last_of_first_day,
            "an entry stands at its latest time"
        );
        let spent: i64 = (0..600).map(|i| 1_000 + i).sum();
        let d = engine.check(&request);
        let now = start + 23_000 * 600;
        // This check's own estimate (1) is reserved on both.
        let left = |spent: i64| Some(Remaining::Usd(Micros(1_000_000_000 - spent - 1)));
        assert_eq!(d.remaining.get("monthly").cloned(), left(spent));
        let in_hour: i64 = (0..600)
            .filter(|i| start + 23_000 * (i + 1) >= now - 3_600_000)
            .map(|i| 1_000 + i)
            .sum();
        assert!(in_hour < spent);
        // A trailing window keeps every time (those before it are folded into one sum).
        let hourly = events_of(&ledger, "hourly");
        let times: Vec<i64> = (0..600)
            .map(|i| start + 23_000 * (i + 1))
            .filter(|&t| t >= now - 3_600_000)
            .collect();
        assert_eq!(hourly.iter().map(|e| e.0).collect::<Vec<_>>(), times);
        assert_eq!(d.remaining.get("hourly").cloned(), left(in_hour));
    }

    /// Days are kept apart at midnight: a call a millisecond before it counts for the
    /// day that admitted it, even when recorded after one admitted a millisecond later.
    #[test]
    fn a_day_budget_turns_at_midnight_exactly() {
        let (engine, clock, ledger) = engine_on(
            "policies: [{name: p, rules: [{id: daily, type: budget, limit_usd: 1, period: day}]}]",
        );
        let midnight = 1_772_496_000_000; // 2026-03-03T00:00Z
        let mut request = Request::default();
        request.estimate.cost_usd = Some(Micros(0));
        clock.set(midnight - 1);
        let before = engine.check(&request).decision_id.to_string();
        clock.set(midnight);
        let after = engine.check(&request).decision_id.to_string();
        engine.record(&after, Micros(300_000)).unwrap();
        engine.record(&before, Micros(600_000)).unwrap();
        assert_eq!(
            events_of(&ledger, "daily"),
            vec![(midnight - 1, 600_000), (midnight, 300_000)]
        );
        request.estimate.cost_usd = Some(Micros(700_000));
        assert!(
            engine.check(&request).allowed,
            "0.30 spent today: 0.70 fits"
        );
        request.estimate.cost_usd = Some(Micros(1));
        assert!(
            !engine.check(&request).allowed,
            "now spent and reserved to the limit"
        );
    }

    /// Spend restored before any check told the counter its window is kept exact, then
    /// folded by the day once a calendar budget's operation reaches the counter.
    #[test]
    fn restored_spend_is_folded_when_its_window_is_known() {
        use crate::ledger::Restore;
        let ledger = Arc::new(MemoryLedger::new());
        let sink = SpendSink {
            policy: "p".into(),
            rule: "monthly".into(),
            by: Vec::new(),
            values: Vec::new(),
        };
        let day = 1_772_409_600_000; // 2026-03-02T00:00Z
        for i in 0..100 {
            let sinks = std::slice::from_ref(&sink);
            ledger
                .restore_spend(i as u128, sinks, day + i * 600_000, Micros(5))
                .unwrap();
        }
        assert_eq!(events_of(&ledger, "monthly").len(), 100);
        let clock = Arc::new(ManualClock::new(day + DAY / 2));
        let engine = Engine::builder()
            .clock(clock)
            .ledger(ledger.clone())
            .build_from_text(
                "policies: [{name: p, rules: [{id: monthly, type: budget, limit_usd: 1, period: month}]}]",
            )
            .unwrap();
        let d = engine.check(&Request::default());
        assert_eq!(
            d.remaining.get("monthly"),
            Some(&Remaining::Usd(Micros(1_000_000 - 500)))
        );
        assert_eq!(
            events_of(&ledger, "monthly"),
            vec![(day + 99 * 600_000, 500)]
        );
    }

    /// Counters of keys that went idle (a full bucket, spend outside its window and no
    /// decision record left to reach it) are swept as other keys are checked: memory
    /// follows the active keys, in both tables.
    #[test]
    fn idle_counters_are_swept() {
        let (engine, clock, ledger) = engine_on(
            "reservation_ttl: 1m\npolicies: [{name: p, rules: [\
             {id: r, type: rate, limit: 1000, per: 1m, by: [user]},\
             {id: b, type: budget, limit_usd: 100, period: 'rolling:1m', by: [user]}]}]",
        );
        let check = |user: usize| {
            let mut request = Request::default();
            request.subject.user = Some(format!("u{user}"));
            request.estimate.cost_usd = Some(Micros(10_000));
            assert!(engine.check(&request).allowed);
        };
        for user in 0..1_000 {
            check(user);
        }
        assert_eq!(ledger.counter_counts(), (1_000, 1_000));
        // Past the window, the bucket's refill and the records' retention (2 minutes).
        clock.advance(10 * 60_000);
        for i in 0..40_000 {
            check(1_000 + i % 1_000);
        }
        let (rates, spends) = ledger.counter_counts();
        assert!(
            rates == 1_000 && spends == 1_000,
            "{rates} rate and {spends} spend counters for 1,000 active users"
        );
    }

    /// A sweep that falls due at a new subject's first operation does not take the
    /// counters its plan's later operations made a moment before (fresh, so they look
    /// idle): the check completes and commits every operation. (The sweep ran after each
    /// committed operation, and a check that met it this way panicked.)
    #[test]
    fn a_sweep_in_the_middle_of_a_plan_keeps_its_new_counters() {
        let (engine, _clock, ledger) = engine_on(
            "policies: [{name: p, rules: [\
             {id: r, type: rate, limit: 1000, per: 1m, by: [user]},\
             {id: b1, type: budget, limit_usd: 100, period: day, by: [user]},\
             {id: b2, type: budget, limit_usd: 100, period: day, by: [user]}]}]",
        );
        let shard =
            |user: &str| super::shard_of(crate::ledger::KeyPrefix::new("p", "r").id(&[user]));
        let request = |user: &str| {
            let mut request = Request::default();
            request.subject.user = Some(user.to_string());
            request.estimate.cost_usd = Some(Micros(10_000));
            request
        };
        // Three operations a check in one shard: a hot user's checks bring its count of
        // operations to one short of a sweep (63), then a new user of that shard checks.
        let hot = "hot";
        let newcomer = (0..)
            .map(|i| format!("n{i}"))
            .find(|u| shard(u) == shard(hot))
            .unwrap();
        for _ in 0..(super::SWEEP_EVERY - 1) / 3 {
            assert!(engine.check(&request(hot)).allowed);
        }
        assert_eq!(ledger.shards[shard(hot)].lock().ops, super::SWEEP_EVERY - 1);
        let d = engine.check(&request(&newcomer));
        assert!(d.allowed, "{d:?}");
        assert_eq!(ledger.shards[shard(hot)].lock().ops, 0, "the sweep has run");
        let usage = engine.usage(None).unwrap();
        for rule in ["b1", "b2"] {
            let reserved = usage
                .iter()
                .find(|u| u.rule == rule && u.key == format!("user={newcomer}"))
                .map(|u| u.reserved_usd);
            assert_eq!(reserved, Some(Micros(10_000)), "{rule} of {newcomer}");
        }
    }

    proptest::proptest! {
        /// The 64-bit shortcut divides as `i128` division does, on both sides of it:
        /// operands that fit 64 bits, and any others (negative, huge).
        #[test]
        fn quotient_is_i128_division(
            small in (0u64.., 1u64..),
            any in (proptest::prelude::any::<i128>(), proptest::prelude::any::<i128>()),
        ) {
            let (n, d) = (i128::from(small.0), i128::from(small.1));
            proptest::prop_assert_eq!(super::quotient(n, d), n / d);
            let (n, d) = any;
            if d != 0 && !(n == i128::MIN && d == -1) {
                proptest::prop_assert_eq!(super::quotient(n, d), n / d);
            }
        }
    }

    /// A token bucket's content survives its split into two halves: any `i128`, of
    /// either sign.
    #[test]
    fn bucket_units_keep_any_i128() {
        for units in [
            0,
            1,
            -1,
            i128::from(u64::MAX),
            i128::from(u64::MAX) + 1,
            i128::from(i64::MIN) - 7,
            i128::from(u64::MAX) * 60_000 + 12_345,
            i128::MAX,
            i128::MIN,
        ] {
            assert_eq!(super::Units::new(units).get(), units, "{units}");
        }
    }

    /// The kept sum of reservations from before the window answers as a walk of the
    /// queue would, through reservations, records, expiries, period turns and a clock
    /// set back.
    #[test]
    fn reservations_before_the_window_are_summed_as_a_walk_would() {
        fn walked(spend: &mut Spend, window_start: i64, now: i64) -> i128 {
            while let Some(r) = spend.reservations.front() {
                if r.expires > now && r.amount != 0 {
                    break;
                }
                spend.reserved_sum -= i128::from(r.amount);
                spend.reservations.pop_front();
            }
            let before: i128 = spend
                .reservations
                .iter()
                .take_while(|r| r.at < window_start)
                .map(|r| i128::from(r.amount))
                .sum();
            spend.reserved_sum - before
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut spend = Spend::default();
        let mut now = 1_000;
        let mut made: Vec<(u64, i64)> = Vec::new();
        for step in 0..20_000 {
            match next(10) {
                0..=3 => {
                    let decision = step as u64;
                    spend.reserve(Reservation {
                        decision,
                        at: now,
                        amount: 1 + next(5) as i64,
                        expires: now + [40, 90][next(2) as usize],
                    });
                    made.push((decision, now));
                }
                4 if !made.is_empty() => {
                    let (decision, at) = made[next(made.len() as u64) as usize];
                    spend.unreserve(u128::from(decision), at);
                    assert!(
                        !spend
                            .reservations
                            .iter()
                            .any(|r| r.decision == decision && r.at == at && r.amount != 0),
                        "step {step}: the reservation of {decision} is still counted"
                    );
                }
                5 => now += next(7) as i64,
                6 if next(50) == 0 => now -= 30,
                _ => {}
            }
            // a calendar period of 100, sometimes a trailing window
            let window_start = if next(4) == 0 {
                now - 60
            } else {
                now / 100 * 100
            };
            let mut reference = spend.clone();
            let expected = walked(&mut reference, window_start, now);
            assert_eq!(
                spend.reserved_since(window_start, now),
                expected,
                "step {step}"
            );
            assert_eq!(spend.reservations.len(), reference.reservations.len());
        }
    }

    /// Decision records are kept for twice the reservation TTL, then swept: under a steady
    /// stream of checks their number stays near what the retention holds.
    #[test]
    fn decision_records_are_swept_after_their_retention() {
        let (engine, clock, ledger) = engine_on(
            "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 1000000, period: day}]}]",
        );
        let mut request = Request::default();
        request.estimate.cost_usd = Some(Micros(1));
        const PER_MINUTE: usize = 640;
        for _minute in 0..100 {
            for _ in 0..PER_MINUTE {
                assert!(engine.check(&request).allowed);
            }
            clock.advance(60_000);
        }
        // retention: 2 × the 15-minute reservation TTL, so 30 minutes of decisions are
        // live; a shard drops the lapsed ones as it takes the next run of decisions, so
        // each shard may hold up to a run's worth that lapsed since
        let live = 31 * PER_MINUTE;
        let slack = super::SHARDS * (1 << super::RUN_BITS);
        let records = ledger.decision_records();
        assert!(
            records <= live + slack,
            "{records} records for {live} live ones (100 minutes made {})",
            100 * PER_MINUTE
        );
        assert!(records >= 30 * PER_MINUTE, "live records swept: {records}");
    }

    /// The decision store finds every kept record by id, across the ring's front moving
    /// on, and none that lapsed; an id kept twice answers with its newest record.
    #[test]
    fn decision_records_are_found_by_id_until_they_lapse() {
        let mut store = Decisions::default();
        let record = |id: u128, at: i64| DecisionRecord {
            id,
            at,
            sinks: Sinks::new(),
            recorded: false,
            retain_until: at + 100,
        };
        // Ids far apart in their high half too, as another engine's would be.
        let id = |n: u128| (n << 70) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for t in 0..1_000i64 {
            store.insert(record(id(t as u128), t), t);
            let lapsed = t - 100;
            if lapsed >= 0 {
                assert!(
                    store.get_mut(id(lapsed as u128)).is_none(),
                    "{lapsed} lapsed"
                );
            }
            for kept in (t - 99).max(0)..=t {
                let r = store.get_mut(id(kept as u128)).expect("kept");
                assert_eq!(r.at, kept);
            }
        }
        assert_eq!(store.records.len(), 100);
        assert_eq!(store.index.len(), 100);
        store.insert(record(id(999), 1_000), 1_000);
        assert_eq!(store.get_mut(id(999)).map(|r| r.at), Some(1_000));
        // The older copy leaves the ring without taking the newer one's index entry.
        store.insert(record(id(5_000), 1_099), 1_099);
        assert_eq!(store.get_mut(id(999)).map(|r| r.at), Some(1_000));
        assert!(store.get_mut(id(998)).is_none());

        // A record kept far longer than the rest (made under a longer TTL) does not hold
        // back the ones behind it, and is found until it lapses.
        let mut store = Decisions::default();
        store.insert(
            DecisionRecord {
                retain_until: 5_000,
                ..record(id(1 << 20), 0)
            },
            0,
        );
        for t in 1..4_000i64 {
            store.insert(record(id(t as u128), t), t);
            assert!(
                store.records.len() <= 102,
                "{} kept at {t}",
                store.records.len()
            );
            assert_eq!(store.get_mut(id(1 << 20)).map(|r| r.at), Some(0));
            assert_eq!(store.get_mut(id(t as u128)).map(|r| r.at), Some(t));
            assert_eq!(store.index.len(), store.records.len());
        }
        store.insert(record(id(7_000), 5_000), 5_000);
        assert!(store.get_mut(id(1 << 20)).is_none(), "lapsed");
    }
}
