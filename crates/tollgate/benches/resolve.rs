//! `resolve`: scope matching + inheritance + guardrails for 1,000 policies (half exact,
//! half glob scopes, some with parents) against random requests.

use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use tollgate::{PolicySet, Request};

fn policy_text(n: usize) -> String {
    let mut s = String::from("policies:\n");
    for i in 0..n {
        s.push_str(&format!("  - name: p{i}\n"));
        if i % 10 == 5 {
            s.push_str(&format!("    inherit: [p{}]\n", i - 5));
        }
        let scope = match i % 4 {
            0 => format!("{{team: [team-{i}]}}"),
            1 => format!("{{team: [\"t{}-*\"], model: [\"gpt-4*\"]}}", i % 100),
            2 => format!("{{user: [\"u{i}\", \"admin-{i}\"], labels.plan: [free]}}"),
            _ => format!("{{key: [\"k{}?\"], agent: [\"*-{}\"]}}", i % 50, i % 7),
        };
        s.push_str(&format!(
            "    match: {scope}\n    guardrails: {{add: [g{}], remove: [g{}]}}\n",
            i % 13,
            (i + 1) % 13
        ));
    }
    s
}

fn requests(n: usize) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let mut r = Request::default();
            r.subject.team = Some(match rng.random_range(0..3) {
                0 => format!("team-{}", rng.random_range(0..1000) * 4),
                1 => format!("t{}-eu", rng.random_range(0..100)),
                _ => "other".into(),
            });
            r.subject.user = Some(format!("u{}", rng.random_range(0..1000)));
            r.subject.key = Some(format!(
                "k{}{}",
                rng.random_range(0..50),
                rng.random_range(0..10)
            ));
            r.subject.agent = Some(format!("a-{}", rng.random_range(0..7)));
            r.model = Some(if rng.random_bool(0.5) {
                "gpt-4o".into()
            } else {
                "claude-3".into()
            });
            r.labels.insert(
                "plan".into(),
                if rng.random_bool(0.5) {
                    "free".into()
                } else {
                    "pro".into()
                },
            );
            r
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let set = PolicySet::compile(&policy_text(1000)).unwrap();
    let reqs = requests(1024);
    let matched: usize = reqs
        .iter()
        .map(|r| set.resolve(r).matched_policies.len())
        .sum();
    eprintln!(
        "resolve: 1000 policies, {:.1} matched per request on average",
        matched as f64 / reqs.len() as f64
    );
    let mut i = 0;
    c.bench_function("resolve/1000-policies", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(set.resolve(black_box(&reqs[i])))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
