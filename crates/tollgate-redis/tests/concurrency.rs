//! Many threads, each with its own engine (as separate instances would be), against one
//! limit in Redis: the limit holds exactly (needs `TOLLGATE_TEST_REDIS`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate::{Engine, ManualClock, Micros, Request};
use tollgate_redis::RedisLedger;

const POLICY: &str = "policies: [{name: p, rules: [
  {id: rpm, type: rate, limit: 100, per: 1h, by: [team]},
  {id: b, type: budget, limit_usd: 1, period: total, by: [user]},
  {id: q, type: quota, resource: gpu, max: 5}]}]";

#[test]
fn instances_share_exact_limits() {
    let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS") else {
        eprintln!("note: TOLLGATE_TEST_REDIS is not set; skipping");
        return;
    };
    let prefix = format!("tollgate-test:conc:{}", std::process::id());
    let instances: Vec<Arc<Engine>> = (0..8)
        .map(|_| {
            let ledger = RedisLedger::connect(&url, &prefix, 1).unwrap();
            let clock = Arc::new(ManualClock::new(1_767_225_600_000));
            Arc::new(
                Engine::builder()
                    .clock(clock)
                    .ledger(Arc::new(ledger))
                    .build_from_text(POLICY)
                    .unwrap(),
            )
        })
        .collect();
    let (rate, budget, quota) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    std::thread::scope(|s| {
        for engine in &instances {
            let (rate, budget, quota) = (rate.clone(), budget.clone(), quota.clone());
            s.spawn(move || {
                for i in 0..60 {
                    let mut r = Request::default();
                    r.subject.team = Some("t".into());
                    if engine.check(&r).allowed {
                        rate.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut r = Request::default();
                    r.subject.user = Some("u".into());
                    r.estimate.cost_usd = Some(Micros(30_000)); // 33 fit in 1 USD
                    if engine.check(&r).allowed {
                        budget.fetch_add(1, Ordering::Relaxed);
                    }
                    let r = Request {
                        resource: Some("gpu".into()),
                        ..Request::default()
                    };
                    if i % 6 == 0 && engine.acquire(&r, None, false).allowed {
                        quota.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let cleanup = RedisLedger::connect(&url, &prefix, 1).unwrap();
    cleanup.delete_all().unwrap();
    assert_eq!(rate.load(Ordering::Relaxed), 100);
    assert_eq!(budget.load(Ordering::Relaxed), 33);
    assert_eq!(quota.load(Ordering::Relaxed), 5);
}
