//! The workload the `decision` bench and the `rule_costs` example share.

use tollgate::{Micros, Request};

/// `n` requests of distinct users over 100 teams, one agent and model, with labels and an
/// estimate that every rule of the bench policy reads.
pub fn requests(n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let mut r = Request::default();
            r.subject.user = Some(format!("u{i}"));
            r.subject.team = Some(format!("t{}", i % 100));
            r.subject.agent = Some("analyst".into());
            r.model = Some("gpt-4o".into());
            r.labels.insert("input".into(), "public".into());
            r.labels.insert("plan".into(), "pro".into());
            r.estimate.cost_usd = Some(Micros(10));
            r.estimate.input_tokens = Some(1000);
            r
        })
        .collect()
}
