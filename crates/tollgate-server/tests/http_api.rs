//! The HTTP API against a real server process: every endpoint, status and error.

mod common;

use common::{ADMIN, Server, client, json_of, status_of};
use serde_json::{Value, json};

const POLICY: &str = r#"
settings:
  worker.batch: {type: integer, default: 8, min: 1, max: 64}
policies:
  - name: base
    guardrails: [pii-mask]
    rules:
      - {id: rpm, type: rate, limit: 2, per: 1m, by: [user]}
      - {id: no-big, type: restrict_models, deny: [big]}
      - {id: monthly, type: budget, limit_usd: 1, period: month, by: [user]}
      - {id: slots, type: quota, resource: gpu, max: 1, by: [user]}
"#;

#[tokio::test]
async fn decisions_records_leases_runs_and_errors() {
    let server = Server::start(Some(POLICY), &[]);
    let c = client();
    let check = |body: Value| c.post(server.url("/v1/check")).json(&body).send();

    let (status, d) = json_of(
        check(json!({"subject": {"user": "u1"}, "estimate": {"cost_usd": "0.4"}}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, d["code"].as_str()), (200, Some("ALLOWED")));
    assert_eq!(d["guardrails"], json!(["pii-mask"]));
    let decision_id = d["decision_id"].as_str().unwrap().to_string();

    let (status, d) = json_of(
        check(json!({"subject": {"user": "u1"}, "model": "big"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, d["rule"].as_str()), (403, Some("no-big")));

    c.post(server.url("/v1/check"))
        .json(&json!({"subject": {"user": "u1"}}))
        .send()
        .await
        .unwrap();
    let r = check(json!({"subject": {"user": "u1"}})).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let (_, d) = json_of(r).await;
    assert_eq!(d["code"], "RATE_LIMITED");

    // explain
    let (_, d) = json_of(
        c.post(server.url("/v1/check?explain=true"))
            .json(&json!({"subject": {"user": "u9"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!d["trace"].as_array().unwrap().is_empty());

    // bad bodies
    let (status, e) = json_of(check(json!({"subjcet": {"user": "u1"}})).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["details"][0]["field"], "subjcet");
    let (status, e) = json_of(
        c.post(server.url("/v1/check"))
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
    let big = format!(
        "{{\"labels\": {{\"x\": \"{}\"}}}}",
        "a".repeat(2 * 1024 * 1024)
    );
    // (a fresh client: the server closes a connection whose body it refused)
    let (status, e) = json_of(
        client()
            .post(server.url("/v1/check"))
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (413, Some("PAYLOAD_TOO_LARGE"))
    );
    let (status, _) = json_of(
        c.post(server.url("/v1/check?explian=true"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);

    // record: once, then duplicate; unknown decisions are 404
    let record = |id: &str, cost: &str| {
        c.post(server.url("/v1/record"))
            .json(&json!({"decision_id": id, "cost_usd": cost}))
            .send()
    };
    // a cost out of range is refused and records nothing (the record below is the first)
    for (cost, message) in [("-0.5", "negative"), ("9007199254.740992", "too large")] {
        let (status, e) = json_of(record(&decision_id, cost).await.unwrap()).await;
        assert_eq!(status, 400, "{cost}");
        assert_eq!(e["error"]["details"][0]["message"], message, "{cost}");
    }
    let (status, r) = json_of(record(&decision_id, "0.25").await.unwrap()).await;
    assert_eq!(
        (status, r),
        (200, json!({"recorded": true, "duplicate": false}))
    );
    let (status, r) = json_of(record(&decision_id, "0.25").await.unwrap()).await;
    assert_eq!(
        (status, r),
        (200, json!({"recorded": true, "duplicate": true}))
    );
    let (status, _) = json_of(
        record("01a20154-31c5-7bfe-9bcd-389f616ff307", "1")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = json_of(record("nope", "1").await.unwrap()).await;
    assert_eq!(status, 400);

    // usage
    let (status, u) = json_of(
        c.get(server.url("/v1/usage?dimension=user&id=u1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(u["items"][0]["spent_usd"], "0.250000");
    assert_eq!(u["items"][0]["remaining_usd"], "0.750000");

    // leases
    let lease = |user: &str| {
        c.post(server.url("/v1/leases"))
            .json(&json!({"subject": {"user": user}, "resource": "gpu"}))
            .send()
    };
    let (status, d) = json_of(lease("u2").await.unwrap()).await;
    assert_eq!(status, 201);
    let lease_id = d["lease_id"].as_str().unwrap().to_string();
    let (status, d) = json_of(lease("u2").await.unwrap()).await;
    assert_eq!((status, d["code"].as_str()), (429, Some("QUOTA_EXCEEDED")));
    assert_eq!(
        status_of(c.delete(server.url(&format!("/v1/leases/{lease_id}")))).await,
        204
    );
    assert_eq!(
        status_of(c.delete(server.url(&format!("/v1/leases/{lease_id}")))).await,
        404
    );
    assert_eq!(lease("u2").await.unwrap().status().as_u16(), 201);
    let (status, _) = json_of(
        c.post(server.url("/v1/leases"))
            .json(&json!({"subject": {"user": "u3"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);

    // runs
    let (status, run) = json_of(
        c.post(server.url("/v1/runs"))
            .json(&json!({"id": "r1", "subject": {"user": "u5"}, "budget_usd": "0.5"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        run["settings"]["worker.batch"],
        json!({"value": 8, "source": "run:r1"})
    );
    assert_eq!(run["budget_usd"], "0.500000");
    assert_eq!(
        status_of(c.post(server.url("/v1/runs")).json(&json!({"id": "r1"}))).await,
        409
    );
    assert_eq!(
        status_of(
            c.post(server.url("/v1/runs"))
                .json(&json!({"id": "r2", "parent": "ghost"}))
        )
        .await,
        422
    );
    let (status, got) = json_of(c.get(server.url("/v1/runs/r1")).send().await.unwrap()).await;
    assert_eq!((status, got["id"].as_str()), (200, Some("r1")));
    assert_eq!(status_of(c.get(server.url("/v1/runs/zz"))).await, 404);
    let (status, d) = json_of(
        check(json!({"subject": {"user": "u6", "run": "r1"}, "estimate": {"cost_usd": "0.6"}}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, d["code"].as_str(), d["policy"].as_str()),
        (429, Some("BUDGET_EXCEEDED"), Some("run:r1"))
    );
    let (status, d) = json_of(
        check(json!({"subject": {"user": "u6", "run": "nope"}}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, d["code"].as_str()), (403, Some("POLICY_DENIED")));

    // effective settings
    let (status, s) = json_of(
        c.get(server.url("/v1/settings/effective?team=t1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &s["settings"]["worker.batch"]),
        (200, &json!({"value": 8, "source": "default"}))
    );
    let (status, _) = json_of(
        c.get(server.url("/v1/settings/effective?run=nope"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);

    // operations
    // Allowed decisions are counted through per-thread handles: each one counts once.
    let metrics_text = || async {
        c.get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let allowed_checks = || async {
        metrics_text()
            .await
            .lines()
            .find(|l| {
                l.starts_with(
                    "tollgate_decisions_total{code=\"ALLOWED\",rule=\"\",endpoint=\"check\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = allowed_checks().await;
    for user in ["m1", "m2", "m3"] {
        let r = check(json!({"subject": {"user": user}})).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!(allowed_checks().await, before + 3);
    assert_eq!(status_of(c.get(server.url("/healthz"))).await, 200);
    assert_eq!(status_of(c.get(server.url("/readyz"))).await, 200);
    let metrics = metrics_text().await;
    assert!(
        metrics.contains("tollgate_decisions_total{code=\"RATE_LIMITED\",rule=\"rpm\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_decision_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_policy_version 1"), "{metrics}");
    let (_, api) = json_of(c.get(server.url("/openapi.json")).send().await.unwrap()).await;
    for path in [
        "/v1/check",
        "/v1/record",
        "/v1/leases",
        "/v1/leases/{id}",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/settings/effective",
        "/v1/usage",
        "/v1/admin/policy",
        "/v1/admin/policy/versions",
        "/v1/admin/policy/versions/{version}",
        "/v1/admin/policy/rollback/{version}",
        "/v1/admin/settings/{key}",
        "/v1/admin/audit",
        "/v1/products/{id}/policy",
        "/v1/products/{id}/admit",
        "/v1/products/{id}/provision",
        "/v1/products/{id}/provision/{lease_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(api["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    // The JSON bodies are described, unknown fields refused as the server refuses them.
    for (path, method, schema) in [
        ("/v1/check", "post", "Request"),
        ("/v1/leases", "post", "Request"),
        ("/v1/record", "post", "RecordBody"),
        ("/v1/runs", "post", "RunSpec"),
        ("/v1/products/{id}/policy", "put", "Limits"),
    ] {
        let body = &api["paths"][path][method]["requestBody"]["content"]["application/json"];
        assert_eq!(
            body["schema"]["$ref"],
            format!("#/components/schemas/{schema}"),
            "{method} {path}"
        );
        assert_eq!(
            api["components"]["schemas"][schema]["additionalProperties"], false,
            "{schema}"
        );
    }
    let subject = &api["components"]["schemas"]["Subject"]["properties"];
    for field in ["product", "team", "key", "user", "agent", "run"] {
        assert!(subject.get(field).is_some(), "Subject lacks {field}");
    }
    // Every `{name}` of a path is declared as a path parameter of each of its operations
    // (a client generated from the document needs it to build the URL).
    for (path, operations) in api["paths"].as_object().unwrap() {
        let names: Vec<&str> = path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, operation) in operations.as_object().unwrap() {
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for name in &names {
                assert!(
                    declared.contains(name),
                    "{method} {path} does not declare its path parameter `{name}`"
                );
            }
            // Every API route answers 401 without a key, once keys are set.
            if path.starts_with("/v1/") {
                assert!(
                    operation["responses"].get("401").is_some(),
                    "{method} {path} does not document its 401"
                );
            }
        }
    }
    assert_eq!(status_of(c.get(server.url("/v2/nothing"))).await, 404);
}

#[tokio::test]
async fn api_and_admin_keys() {
    let server = Server::start(None, &[("TOLLGATE_API_KEYS", "svc=data-key")]);
    let c = client();
    let (status, e) = json_of(
        c.post(server.url("/v1/check"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );
    let r = c
        .post(server.url("/v1/check"))
        .bearer_auth("wrong")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(server.url("/v1/check"))
        .bearer_auth("data-key")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(status_of(c.get(server.url("/v1/admin/policy"))).await, 401);
    assert_eq!(
        status_of(
            c.get(server.url("/v1/admin/policy"))
                .header("X-Admin-Key", "nope")
        )
        .await,
        401
    );
    assert_eq!(
        status_of(
            c.get(server.url("/v1/admin/policy"))
                .header("X-Admin-Key", ADMIN)
        )
        .await,
        200
    );

    // Without any admin key configured, the control plane refuses everything.
    let closed = Server::start(None, &[("TOLLGATE_ADMIN_KEYS", "")]);
    let r = c
        .get(closed.url("/v1/admin/policy"))
        .header("X-Admin-Key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// Every data-plane route checks the API key before anything else, and a good key passes.
#[tokio::test]
async fn every_data_plane_route_checks_the_api_key() {
    let server = Server::start(None, &[("TOLLGATE_API_KEYS", "svc=data-key")]);
    let c = client();
    let routes = [
        (reqwest::Method::POST, "/v1/check"),
        (reqwest::Method::POST, "/v1/record"),
        (reqwest::Method::POST, "/v1/leases"),
        (reqwest::Method::DELETE, "/v1/leases/x"),
        (reqwest::Method::POST, "/v1/runs"),
        (reqwest::Method::GET, "/v1/runs/x"),
        (reqwest::Method::GET, "/v1/settings/effective"),
        (reqwest::Method::GET, "/v1/usage"),
        (reqwest::Method::POST, "/v1/products/p/admit"),
        (reqwest::Method::POST, "/v1/products/p/provision"),
        (reqwest::Method::DELETE, "/v1/products/p/provision/x"),
    ];
    for (method, path) in routes {
        let request = || c.request(method.clone(), server.url(path)).json(&json!({}));
        assert_eq!(
            status_of(request()).await,
            401,
            "{method} {path} without a key"
        );
        assert_eq!(
            status_of(request().bearer_auth("wrong")).await,
            401,
            "{method} {path} with a wrong key"
        );
        assert_ne!(
            status_of(request().bearer_auth("data-key")).await,
            401,
            "{method} {path} with the key"
        );
    }
}

#[tokio::test]
async fn control_plane_versions_settings_and_audit() {
    let server = Server::start(Some(POLICY), &[]);
    let c = client();
    let admin = |r: reqwest::RequestBuilder| r.header("X-Admin-Key", ADMIN);

    let (status, p) = json_of(
        admin(c.get(server.url("/v1/admin/policy")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, p["version"].as_u64()), (200, Some(1)));
    assert_eq!(p["document"]["policies"][0]["name"], "base");
    let yaml = admin(c.get(server.url("/v1/admin/policy?format=yaml")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(yaml, POLICY);

    // invalid: 422 with every error, located; nothing changes
    let bad = "policies:\n  - {name: a, inherit: [ghost]}\n  - {name: b, rules: [{id: r, type: rate, limit: 1, per: forever}]}\n";
    let (status, e) = json_of(
        admin(c.put(server.url("/v1/admin/policy")))
            .body(bad)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("INVALID_POLICY"))
    );
    let details = e["error"]["details"].as_array().unwrap();
    assert_eq!(details.len(), 2);
    assert_eq!(
        (details[0]["line"].as_u64(), details[0]["path"].as_str()),
        (Some(2), Some("policies[0].inherit[0]"))
    );
    assert_eq!(details[1]["line"].as_u64(), Some(3));

    // stale If-Match: 409; right one: applied (JSON body this time)
    let new = json!({"policies": [{"name": "only", "rules": [{"id": "no-x", "type": "restrict_models", "deny": ["x"]}]}]}).to_string();
    let r = admin(c.put(server.url("/v1/admin/policy")))
        .header("If-Match", "5")
        .body(new.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    // an If-Match that is no version at all is the caller's error, not a stale version
    for bad in ["latest", "-1", "99999999999999999999999"] {
        let r = admin(c.put(server.url("/v1/admin/policy")))
            .header("If-Match", bad)
            .body(new.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
    let r = admin(c.put(server.url("/v1/admin/policy")))
        .header("If-Match", "\"1\"")
        .header("X-Reason", "tighten models")
        .header("Content-Type", "application/json")
        .body(new)
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v["version"].as_u64()), (200, Some(2)));
    // the very next request sees it
    let (status, d) = json_of(
        c.post(server.url("/v1/check"))
            .json(&json!({"model": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, d["policy_version"].as_u64()), (403, Some(2)));

    // versions, fetch, rollback
    let (_, vs) = json_of(
        admin(c.get(server.url("/v1/admin/policy/versions")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let versions: Vec<u64> = vs["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 1]);
    // A query parameter a route does not take is refused, naming it.
    for (url, message) in [
        (
            "/v1/admin/policy/versions?limit=1",
            "unknown query parameter `limit` (this route takes none)",
        ),
        (
            "/v1/admin/audit?limt=1",
            "unknown query parameter `limt` (accepted: limit)",
        ),
    ] {
        let (status, e) = json_of(admin(c.get(server.url(url))).send().await.unwrap()).await;
        assert_eq!(status, 400, "{url}");
        assert_eq!(e["error"]["message"], message, "{url}");
        assert_eq!(
            e["error"]["details"][0]["field"],
            url.split(['?', '=']).nth(1).unwrap()
        );
    }
    assert_eq!(vs["versions"][0]["actor"], "alice");
    assert_eq!(vs["versions"][0]["reason"], "tighten models");
    let (status, v1) = json_of(
        admin(c.get(server.url("/v1/admin/policy/versions/1")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, v1["document"]["policies"][0]["name"].as_str()),
        (200, Some("base"))
    );
    assert_eq!(
        status_of(admin(c.get(server.url("/v1/admin/policy/versions/99")))).await,
        404
    );
    let (status, r) = json_of(
        admin(c.post(server.url("/v1/admin/policy/rollback/1")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, r["version"].as_u64()), (200, Some(3)));
    let (_, d) = json_of(
        c.post(server.url("/v1/check"))
            .json(&json!({"model": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (d["allowed"].as_bool(), d["policy_version"].as_u64()),
        (Some(true), Some(3))
    );

    // settings overrides
    let put = |key: &str, scope: &str, value: Value| {
        admin(c.put(server.url(&format!("/v1/admin/settings/{key}?scope={scope}"))))
            .header("X-Reason", "tuning")
            .json(&json!({"value": value}))
            .send()
    };
    let (status, e) = json_of(put("worker.batch", "team:t1", json!(100)).await.unwrap()).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("INVALID_SETTING"))
    );
    assert_eq!(
        put("no.such", "global", json!(1))
            .await
            .unwrap()
            .status()
            .as_u16(),
        422
    );
    assert_eq!(
        put("worker.batch", "galaxy:x", json!(1))
            .await
            .unwrap()
            .status()
            .as_u16(),
        422
    );
    let (status, r) = json_of(put("worker.batch", "team:t1", json!(16)).await.unwrap()).await;
    assert_eq!((status, &r["previous"]), (200, &Value::Null));
    let (_, s) = json_of(
        c.get(server.url("/v1/settings/effective?team=t1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        s["settings"]["worker.batch"],
        json!({"value": 16, "source": "override:team:t1"})
    );
    let del = admin(c.delete(server.url("/v1/admin/settings/worker.batch?scope=team:t1")))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 204);
    let del = admin(c.delete(server.url("/v1/admin/settings/worker.batch?scope=team:t1")))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 404);

    // audit: newest first, with who / what / from / to / why
    let (_, a) = json_of(
        admin(c.get(server.url("/v1/admin/audit?limit=3")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let entries = a["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        (
            entries[0]["action"].as_str(),
            entries[0]["from"].as_str(),
            entries[0]["to"].as_str()
        ),
        (Some("setting.remove"), Some("16"), None)
    );
    assert_eq!(
        (
            entries[1]["action"].as_str(),
            entries[1]["to"].as_str(),
            entries[1]["reason"].as_str()
        ),
        (Some("setting.set"), Some("16"), Some("tuning"))
    );
    assert_eq!(
        (
            entries[2]["action"].as_str(),
            entries[2]["from"].as_str(),
            entries[2]["to"].as_str()
        ),
        (Some("policy.rollback"), Some("2"), Some("3"))
    );
    assert_eq!(entries[2]["actor"], "alice");

    // If-Match: * accepts whatever version is current
    let r = admin(c.put(server.url("/v1/admin/policy")))
        .header("If-Match", "*")
        .body("policies: []")
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v["version"].as_u64()), (200, Some(4)), "{v}");
}

#[tokio::test]
async fn product_admission_convention() {
    let server = Server::start(None, &[]);
    let c = client();
    let limits = |id: &str, body: Value| {
        c.put(server.url(&format!("/v1/products/{id}/policy")))
            .header("X-Admin-Key", ADMIN)
            .json(&body)
            .send()
    };
    assert_eq!(
        status_of(
            c.put(server.url("/v1/products/acme/policy"))
                .json(&json!({}))
        )
        .await,
        401
    );
    let (status, r) = json_of(
        limits("acme", json!({"max_engines": 2, "rate_limit_rpm": 3}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, r["version"].as_u64()), (200, Some(2)));
    assert_eq!(
        limits("acme", json!({"max_engins": 2}))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    // a limit past i64 is the caller's field that is too large (not a 422 about the
    // generated policy), and changes nothing
    for field in ["max_engines", "rate_limit_rpm"] {
        let (status, e) = json_of(limits("acme", json!({field: u64::MAX})).await.unwrap()).await;
        assert_eq!(status, 400, "{field}");
        assert_eq!(e["error"]["details"][0]["field"], field);
    }
    let (_, policy) = json_of(
        c.get(server.url("/v1/admin/policy"))
            .header("X-Admin-Key", ADMIN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(policy["version"], 2, "{policy}");

    let provision = |id: &str| {
        c.post(server.url(&format!("/v1/products/{id}/provision")))
            .send()
    };
    let (status, first) = json_of(provision("acme").await.unwrap()).await;
    assert_eq!(status, 201);
    assert_eq!(provision("acme").await.unwrap().status().as_u16(), 201);
    let (status, e) = json_of(provision("acme").await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(
        e["error"],
        json!({"code": "QUOTA_EXCEEDED", "message": "Product at max_engines limit (2).", "details": e["error"]["details"]})
    );
    let lease = first["lease_id"].as_str().unwrap();
    assert_eq!(
        status_of(c.delete(server.url(&format!("/v1/products/acme/provision/{lease}")))).await,
        204
    );
    assert_eq!(provision("acme").await.unwrap().status().as_u16(), 201);

    let admit = |id: &str| {
        c.post(server.url(&format!("/v1/products/{id}/admit")))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(admit("acme").await.unwrap().status().as_u16(), 200);
    }
    let r = admit("acme").await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, e) = json_of(r).await;
    assert_eq!(e["error"]["code"], "RATE_LIMITED");
    assert_eq!(
        e["error"]["message"],
        format!("Rate limit exceeded. Retry in {retry} seconds.")
    );

    // another product has no limits; `{}` removes acme's
    for _ in 0..5 {
        assert_eq!(admit("other").await.unwrap().status().as_u16(), 200);
    }
    limits("acme", json!({})).await.unwrap();
    assert_eq!(admit("acme").await.unwrap().status().as_u16(), 200);
    assert_eq!(provision("acme").await.unwrap().status().as_u16(), 201);
    // lowering max_engines keeps the live engines and refuses new ones
    limits("acme", json!({"max_engines": 1})).await.unwrap();
    assert_eq!(provision("acme").await.unwrap().status().as_u16(), 429);
}
