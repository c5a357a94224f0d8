//! Replaying recorded spend after a restart: days before the engine's exact horizon
//! come back as one sum a counter and day, later calls one by one, and every budget,
//! velocity and forecast reads what it read before the restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate::ledger::{LedgerError, Restore, SpendSink};
use tollgate::request::Subject;
use tollgate::{Clock, Engine, ManualClock, MemoryLedger, Micros, Request};
use tollgate_store::Store;

const POLICY: &str = "reservation_ttl: 1h
policies: [{name: p, rules: [
  {id: monthly, type: budget, limit_usd: 1000, period: month, by: [user]},
  {id: weekly, type: budget, limit_usd: 1000, period: week, by: [user]},
  {id: lifetime, type: budget, limit_usd: 1000, period: total, by: [user]},
  {id: two-days, type: budget, limit_usd: 1000, period: 'rolling:2d', by: [user]},
  {id: velocity, type: cost_velocity, limit_usd: 1000, window: 6h, by: [user]},
  {id: forecast, type: forecast, monthly_budget_usd: 100000, lookback: 3d}]}]";

/// A ledger that counts how it is restored.
struct Counting {
    inner: MemoryLedger,
    calls: AtomicUsize,
    days: AtomicUsize,
}

impl Restore for Counting {
    fn restore_spend(
        &self,
        decision: u128,
        sinks: &[SpendSink],
        at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.restore_spend(decision, sinks, at, cost)
    }
    fn restore_spend_day(
        &self,
        sink: &SpendSink,
        last_at: i64,
        cost: Micros,
    ) -> Result<(), LedgerError> {
        self.days.fetch_add(1, Ordering::Relaxed);
        self.inner.restore_spend_day(sink, last_at, cost)
    }
    fn restore_lease(
        &self,
        id: u128,
        resource: &str,
        subject: &Subject,
        expires_at: Option<i64>,
    ) -> Result<(), LedgerError> {
        self.inner.restore_lease(id, resource, subject, expires_at)
    }
}

fn engine(ledger: Arc<MemoryLedger>, clock: Arc<ManualClock>) -> Engine {
    Engine::builder()
        .clock(clock)
        .ledger(ledger)
        .build_from_text(POLICY)
        .unwrap()
}

fn request(user: usize) -> Request {
    let mut r = Request::default();
    r.subject.user = Some(format!("u{user}"));
    r.estimate.cost_usd = Some(Micros(1));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_days_come_back_as_sums_and_every_window_reads_the_same() {
    let dir = std::env::temp_dir().join(format!("tollgate-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open_dir(&dir).await.unwrap();

    // 2026-03-20T00:00Z, then calls 37 minutes apart for three users until 13:40 on the
    // fortieth day (so that each trailing window starts in the middle of a day, where a
    // day's sum would count more than the calls after its start), recorded in the order
    // a server records them: the store first, then the ledger.
    let clock = Arc::new(ManualClock::new(1_773_964_800_000));
    let ledger = Arc::new(MemoryLedger::new());
    let before = engine(ledger.clone(), clock.clone());
    let calls = 1_540;
    for i in 0..calls {
        clock.advance(37 * 60_000);
        let d = before.check(&request(i % 3));
        assert!(d.allowed, "{d:?}");
        let id = u128::from_str_radix(&d.decision_id.replace('-', ""), 16).unwrap();
        let now = clock.now_ms();
        let pending = ledger.begin_record(id, now).unwrap();
        let cost = Micros(1_000 + (i as i64 * 7919) % 5_000);
        store
            .record_spend(&d.decision_id, pending.at, cost, now, pending.sinks.clone())
            .await
            .unwrap();
        ledger.finish_record(&pending, cost);
    }

    // A restart: a fresh ledger, replayed.
    let now = clock.now_ms();
    let restored = Arc::new(Counting {
        inner: MemoryLedger::new(),
        calls: AtomicUsize::new(0),
        days: AtomicUsize::new(0),
    });
    let probe = engine(Arc::new(MemoryLedger::new()), clock.clone());
    let since = probe.exact_spend_since(now);
    // The longest trailing window is 3 days; records may come 2 hours late; a day spare.
    assert_eq!(
        since,
        (now - 4 * 86_400_000).div_euclid(86_400_000) * 86_400_000
    );
    store
        .replay_counters(restored.as_ref(), now, since)
        .await
        .unwrap();
    let (exact, days) = (
        restored.calls.load(Ordering::Relaxed),
        restored.days.load(Ordering::Relaxed),
    );
    assert!(
        days > 0 && exact < calls / 5,
        "{exact} calls and {days} day sums replayed"
    );
    let restored = Arc::try_unwrap(restored).ok().expect("one owner").inner;
    let after = engine(Arc::new(restored), clock.clone());

    let spent = |e: &Engine| {
        let mut rows: Vec<_> = e
            .usage(None)
            .unwrap()
            .into_iter()
            .map(|u| (u.rule, u.key, u.spent_usd))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(spent(&after), spent(&before));
    for user in 0..3 {
        let (a, b) = (after.check(&request(user)), before.check(&request(user)));
        assert_eq!(a.remaining, b.remaining, "user {user}");
        assert_eq!((a.allowed, a.code), (b.allowed, b.code));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
