//! # tollgate-store
//!
//! The durable side of a tollgate server: policy versions, the audit log, settings
//! overrides, runs, live leases and the spend ledger. The embedded default is one SQLite
//! file in WAL mode with `synchronous = FULL`; PostgreSQL (`postgres://…`) serves many
//! instances, which learn of each other's changes through `LISTEN`/`NOTIFY`. Spend
//! records go through a group-commit writer, so a `record` is acknowledged only once it
//! is committed, and many concurrent records share one commit.
//!
//! Both backends go through one `sqlx` `Any` pool; the SQL is written once with `?`
//! placeholders (rewritten to `$n` for PostgreSQL); only the migrations differ.
//!
//! Hot counters (rate buckets, reservations) stay in the ledger; at start-up
//! [`Store::restore_engine`] and [`Store::replay_counters`] bring back the durable state.
#![warn(missing_docs)]

use std::path::Path;
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row, SqlSafeStr, SqlStr};
use tokio::sync::{mpsc, oneshot};

use tollgate::ledger::{Restore, SpendSink};
use tollgate::request::{Dimension, Subject};
use tollgate::{Engine, Micros, RunInfo, RunSpec};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Stored data could not be read back.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The data directory could not be created.
    #[error("data directory `{0}`: {1}")]
    DataDir(String, std::io::Error),
    /// The group-commit writer is gone (the server is shutting down).
    #[error("the spend writer has stopped")]
    WriterStopped,
}

/// A stored policy version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// The version number.
    pub version: u64,
    /// The document as submitted (YAML or JSON).
    pub source: String,
    /// When (ms since the epoch).
    pub created_at: i64,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its id (increasing).
    pub id: i64,
    /// When (RFC 3339).
    pub at: String,
    /// Who.
    pub actor: String,
    /// What: `policy.replace`, `policy.rollback`, `setting.set`, `setting.remove`,
    /// `product.policy`, `run.create`.
    pub action: String,
    /// On what.
    pub target: String,
    /// The value before (JSON text), if any.
    pub from: Option<String>,
    /// The value after (JSON text), if any.
    pub to: Option<String>,
    /// Why.
    pub reason: String,
}

/// An audit entry to write.
#[derive(Clone, Debug)]
pub struct Change<'a> {
    /// Who.
    pub actor: &'a str,
    /// What.
    pub action: &'a str,
    /// On what.
    pub target: &'a str,
    /// Before.
    pub from: Option<String>,
    /// After.
    pub to: Option<String>,
    /// Why.
    pub reason: &'a str,
}

struct SpendWrite {
    decision: String,
    at: i64,
    cost: i64,
    recorded_at: i64,
    sinks: Vec<SpendSink>,
}

type WriteReply = oneshot::Sender<Result<(), String>>;

/// The durable store.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    postgres: bool,
    url: String,
    writer: mpsc::Sender<(SpendWrite, WriteReply)>,
}

/// The channel on which PostgreSQL instances announce policy and settings changes.
pub const CHANGES_CHANNEL: &str = "tollgate_changes";

/// `?` placeholders as PostgreSQL's `$1, $2, …`. Only the static SQL of this file goes
/// through here (no `?` appears in it but as a placeholder), so the result is safe.
fn dialect(postgres: bool, sql: &'static str) -> SqlStr {
    if !postgres {
        return sql.into_sql_str();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    AssertSqlSafe(out).into_sql_str()
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Up to this many spend records share one transaction (one fsync).
const GROUP: usize = 256;

impl Store {
    /// Opens (creating if needed) `DIR/tollgate.db` and applies the migrations.
    pub async fn open_dir(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::DataDir(dir.display().to_string(), e))?;
        let url = format!("sqlite://{}?mode=rwc", dir.join("tollgate.db").display());
        Store::open(&url).await
    }

    /// Opens a database by URL (`sqlite://PATH`, `postgres://…`) and applies the migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres:") || url.starts_with("postgresql:");
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 8 } else { 4 })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        // WAL with FULL sync: an acknowledged write survives a crash of the
                        // process and of the machine.
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        if postgres {
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        } else {
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(group_commit(pool.clone(), postgres, rx));
        Ok(Store {
            pool,
            postgres,
            url: url.to_string(),
            writer: tx,
        })
    }

    /// Whether this store is PostgreSQL (shared by many instances).
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn sql(&self, sql: &'static str) -> SqlStr {
        dialect(self.postgres, sql)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(self.sql("SELECT 1"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Closes the pool after the pending writes (graceful shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- policy versions -------------------------------------------------------------

    /// The newest version.
    pub async fn latest_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
        let row = sqlx::query(self.sql("SELECT version, source, created_at, actor, reason FROM policy_versions ORDER BY version DESC LIMIT 1"))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| policy_row(&r)))
    }

    /// One version.
    pub async fn policy_version(&self, version: u64) -> Result<Option<PolicyVersion>, StoreError> {
        let row = sqlx::query(self.sql("SELECT version, source, created_at, actor, reason FROM policy_versions WHERE version = ?"))
            .bind(version as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| policy_row(&r)))
    }

    /// Every version, newest first, without their documents.
    pub async fn policy_versions(&self) -> Result<Vec<PolicyVersion>, StoreError> {
        let rows = sqlx::query(self.sql("SELECT version, '' AS source, created_at, actor, reason FROM policy_versions ORDER BY version DESC"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(policy_row).collect())
    }

    /// Writes a new version and its audit entry in one transaction. Fails (changing
    /// nothing) when `version` exists already: a concurrent writer won.
    pub async fn insert_policy(
        &self,
        version: &PolicyVersion,
        change: Change<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(self.sql("INSERT INTO policy_versions (version, source, created_at, actor, reason) VALUES (?, ?, ?, ?, ?)"))
            .bind(version.version as i64)
            .bind(&version.source)
            .bind(version.created_at)
            .bind(&version.actor)
            .bind(&version.reason)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, self.postgres, version.created_at, &change).await?;
        self.announce(&mut tx, "policy").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Tells the other instances (PostgreSQL) that something changed; delivered at commit.
    async fn announce(
        &self,
        tx: &mut sqlx::AnyConnection,
        what: &'static str,
    ) -> Result<(), StoreError> {
        if self.postgres {
            sqlx::query(self.sql("SELECT pg_notify(?, ?)"))
                .bind(CHANGES_CHANNEL)
                .bind(what)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// A small stored fact.
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(self.sql("SELECT value FROM meta WHERE key = ?"))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Sets a small stored fact.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(self.sql("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"))
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- audit -------------------------------------------------------------------------

    /// Writes an audit entry on its own.
    pub async fn audit(&self, at: i64, change: Change<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_audit(&mut tx, self.postgres, at, &change).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest `limit` entries, newest first.
    pub async fn audit_entries(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(self.sql("SELECT id, at, actor, action, target, from_value, to_value, reason FROM audit ORDER BY id DESC LIMIT ?"))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get(0),
                at: tollgate::rfc3339(r.get(1)),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                from: r.get(5),
                to: r.get(6),
                reason: r.get(7),
            })
            .collect())
    }

    // ---- settings overrides ------------------------------------------------------------

    /// Sets (`Some`) or removes (`None`) an override, with its audit entry, atomically.
    pub async fn put_override(
        &self,
        scope: &str,
        key: &str,
        value: Option<&serde_json::Value>,
        at: i64,
        change: Change<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        match value {
            Some(v) => {
                sqlx::query(self.sql("INSERT INTO settings_overrides (scope, key, value) VALUES (?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value"))
                    .bind(scope)
                    .bind(key)
                    .bind(v.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                sqlx::query(self.sql("DELETE FROM settings_overrides WHERE scope = ? AND key = ?"))
                    .bind(scope)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        insert_audit(&mut tx, self.postgres, at, &change).await?;
        self.announce(&mut tx, "settings").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every override, as (scope, key, value).
    pub async fn overrides(&self) -> Result<Vec<(String, String, serde_json::Value)>, StoreError> {
        let rows = sqlx::query(self.sql("SELECT scope, key, value FROM settings_overrides"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let value: String = r.get(2);
                let value = serde_json::from_str(&value)
                    .map_err(|e| StoreError::Corrupt(format!("override value: {e}")))?;
                Ok((r.get(0), r.get(1), value))
            })
            .collect()
    }

    // ---- runs --------------------------------------------------------------------------

    /// Stores a created run.
    pub async fn insert_run(
        &self,
        spec: &RunSpec,
        info: &RunInfo,
        at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(self.sql("INSERT INTO runs (id, spec, info, created_at) VALUES (?, ?, ?, ?)"))
            .bind(&info.id)
            .bind(json(spec)?)
            .bind(json(info)?)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every run, in creation order (parents before children).
    pub async fn runs(&self) -> Result<Vec<(RunSpec, RunInfo)>, StoreError> {
        let rows = sqlx::query(self.sql(if self.postgres {
            "SELECT spec, info FROM runs ORDER BY seq"
        } else {
            "SELECT spec, info FROM runs ORDER BY rowid"
        }))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse(&r.get::<String, _>(0))?,
                    parse(&r.get::<String, _>(1))?,
                ))
            })
            .collect()
    }

    /// One run (an instance that does not know it yet restores it from here).
    pub async fn run(&self, id: &str) -> Result<Option<(RunSpec, RunInfo)>, StoreError> {
        let row = sqlx::query(self.sql("SELECT spec, info FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                parse(&r.get::<String, _>(0))?,
                parse(&r.get::<String, _>(1))?,
            ))
        })
        .transpose()
    }

    /// The policy set a run was created on, compiled.
    async fn run_policy(
        &self,
        engine: &Engine,
        info: &RunInfo,
    ) -> Result<tollgate::PolicySet, StoreError> {
        let source = self
            .policy_version(info.policy_version)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "run `{}` names missing policy version {}",
                    info.id, info.policy_version
                ))
            })?;
        engine
            .compile(&source.source)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Restores a run (and, first, its missing ancestors) from the store into the engine.
    pub async fn restore_run(&self, engine: &Engine, id: &str) -> Result<bool, StoreError> {
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next.take() {
            if engine.run(&id).is_some() {
                break;
            }
            let Some((spec, info)) = self.run(&id).await? else {
                return Ok(false);
            };
            next = info.parent.clone();
            chain.push((spec, info));
        }
        for (spec, info) in chain.into_iter().rev() {
            let set = self.run_policy(engine, &info).await?;
            // Another request may have restored it meanwhile: that is fine.
            let _ = engine.restore_run(&spec, info, set);
        }
        Ok(true)
    }

    /// Catches up with changes made by other instances: a newer policy version, and the
    /// overrides as stored. Returns whether the policy version changed.
    pub async fn sync(&self, engine: &Engine) -> Result<bool, StoreError> {
        let mut changed = false;
        if let Some(latest) = self.latest_policy().await?
            && latest.version > engine.policy().version()
        {
            let set = engine.compile(&latest.source).map_err(|e| {
                StoreError::Corrupt(format!(
                    "policy version {} does not compile here: {e}",
                    latest.version
                ))
            })?;
            engine.install_version(set, latest.version);
            changed = true;
        }
        engine.replace_overrides(self.overrides().await?);
        Ok(changed)
    }

    /// Subscribes to the other instances' changes (PostgreSQL: `LISTEN`). Call it before
    /// loading the engine from the store and before serving, so that no change committed
    /// after the load goes unnoticed: its notification waits in the subscription until
    /// [`ChangeFeed::follow`] reads it. On SQLite (one instance) the feed is empty.
    pub async fn change_feed(&self) -> Result<ChangeFeed, StoreError> {
        let listener = if self.postgres {
            Some(self.listen().await?)
        } else {
            None
        };
        Ok(ChangeFeed {
            store: self.clone(),
            listener,
        })
    }

    async fn listen(&self) -> Result<sqlx::postgres::PgListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(listener)
    }

    // ---- leases ------------------------------------------------------------------------

    /// Stores a granted lease.
    pub async fn insert_lease(
        &self,
        id: &str,
        resource: &str,
        subject: &Subject,
        expires_at: Option<i64>,
        at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(self.sql("INSERT INTO leases (id, resource, subject, expires_at, created_at) VALUES (?, ?, ?, ?, ?)"))
            .bind(id)
            .bind(resource)
            .bind(json(subject)?)
            .bind(expires_at)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes a lease; `false` when there was none.
    pub async fn delete_lease(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(self.sql("DELETE FROM leases WHERE id = ?"))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- spend -------------------------------------------------------------------------

    /// Makes a recorded cost durable; returns once it is committed (group commit).
    pub async fn record_spend(
        &self,
        decision: &str,
        at: i64,
        cost: Micros,
        recorded_at: i64,
        sinks: Vec<SpendSink>,
    ) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        let write = SpendWrite {
            decision: decision.to_string(),
            at,
            cost: cost.0,
            recorded_at,
            sinks,
        };
        self.writer
            .send((write, reply))
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Corrupt(e)),
            Err(_) => Err(StoreError::WriterStopped),
        }
    }

    /// Whether a decision's cost was recorded (idempotency across restarts).
    pub async fn spend_recorded(&self, decision: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(self.sql("SELECT 1 FROM spend WHERE decision_id = ?"))
            .bind(decision)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    // ---- restore -----------------------------------------------------------------------

    /// The newest policy version, the overrides and the runs, into a fresh engine.
    pub async fn restore_engine(&self, engine: &Engine) -> Result<Option<u64>, StoreError> {
        let Some(latest) = self.latest_policy().await? else {
            return Ok(None);
        };
        let set = engine.compile(&latest.source).map_err(|e| {
            StoreError::Corrupt(format!(
                "stored policy version {} no longer compiles: {e}",
                latest.version
            ))
        })?;
        engine.install_version(set, latest.version);
        for (scope, key, value) in self.overrides().await? {
            if let Err(e) = engine.set_setting(&scope, &key, value) {
                tracing::warn!(%scope, %key, error = %e, "stored override no longer applies; ignored");
            }
        }
        for (spec, info) in self.runs().await? {
            let set = self.run_policy(engine, &info).await?;
            engine
                .restore_run(&spec, info, set)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        tracing::info!(
            version = latest.version,
            "restored the policy, overrides and runs"
        );
        Ok(Some(latest.version))
    }

    /// Live leases and every recorded spend, into a ledger (a fresh one at start-up, or
    /// a shared one that lost its data): spend checked from `exact_since` on call by
    /// call, at exact times, and older spend as one sum a counter and day
    /// ([`Engine::exact_spend_since`] says where the line goes for a policy).
    pub async fn replay_counters(
        &self,
        ledger: &(dyn Restore + Sync),
        now: i64,
        exact_since: i64,
    ) -> Result<(), StoreError> {
        let leases = sqlx::query(self.sql("SELECT id, resource, subject, expires_at FROM leases WHERE expires_at IS NULL OR expires_at > ?"))
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        for r in &leases {
            let id: String = r.get(0);
            let id = uuid_u128(&id)?;
            let subject: Subject = parse(&r.get::<String, _>(2))?;
            ledger
                .restore_lease(id, &r.get::<String, _>(1), &subject, r.get(3))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        let first_exact_day = exact_since.div_euclid(DAY_MS);
        // Streamed, not collected: a store holds every recorded call (a million of them
        // collected took 2.7 GB). See ARCHITECTURE.md.
        let mut days = sqlx::query(self.sql(
            "SELECT policy, rule, dims, vals, cost, last_at FROM spend_days WHERE day < ? ORDER BY day",
        ))
        .bind(first_exact_day)
        .fetch(&self.pool);
        let mut day_rows = 0usize;
        while let Some(r) = days.try_next().await? {
            day_rows += 1;
            let sink = spend_sink(
                &r.get::<String, _>(0),
                &r.get::<String, _>(1),
                &r.get::<String, _>(2),
                &r.get::<String, _>(3),
            )?;
            ledger
                .restore_spend_day(&sink, r.get(5), Micros(r.get(4)))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        // In check-time order, so that a ledger that keeps spend sorted by time appends it
        // (in decision order, each one was inserted at random into spend every call
        // shares, such as a forecast's); a row per decision with its counters as JSON, not
        // a row per counter: each row crosses from SQLite's thread to this one, and that
        // hand-off was most of the replay's time. Grouped by time first, so that SQLite
        // reads from `spend_at` (by decision first, it scanned every call ever stored).
        let calls = if self.postgres {
            "SELECT s.decision_id, s.at, s.cost, json_agg(json_build_array(k.policy, k.rule, k.dims, k.vals))::text FROM spend s JOIN spend_sinks k ON k.decision_id = s.decision_id WHERE s.at >= ? GROUP BY s.at, s.decision_id, s.cost ORDER BY s.at, s.decision_id"
        } else {
            "SELECT s.decision_id, s.at, s.cost, json_group_array(json_array(k.policy, k.rule, k.dims, k.vals)) FROM spend s JOIN spend_sinks k ON k.decision_id = s.decision_id WHERE s.at >= ? GROUP BY s.at, s.decision_id, s.cost ORDER BY s.at, s.decision_id"
        };
        let mut rows = sqlx::query(self.sql(calls))
            .bind(first_exact_day.saturating_mul(DAY_MS))
            .fetch(&self.pool);
        let mut call_rows = 0usize;
        while let Some(r) = rows.try_next().await? {
            call_rows += 1;
            let counters: Vec<[String; 4]> = parse(&r.get::<String, _>(3))?;
            let sinks = counters
                .iter()
                .map(|[policy, rule, dims, vals]| spend_sink(policy, rule, dims, vals))
                .collect::<Result<Vec<_>, _>>()?;
            ledger
                .restore_spend(
                    uuid_u128(&r.get::<String, _>(0))?,
                    &sinks,
                    r.get(1),
                    Micros(r.get(2)),
                )
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        tracing::info!(
            leases = leases.len(),
            day_rows,
            call_rows,
            "replayed leases and spend into the ledger"
        );
        Ok(())
    }
}

const DAY_MS: i64 = tollgate::duration::Millis::DAY.0;

/// A counter as the store names it: policy, rule, and its dimensions and values as JSON.
fn spend_sink(policy: &str, rule: &str, dims: &str, vals: &str) -> Result<SpendSink, StoreError> {
    let dims: Vec<String> = parse(dims)?;
    Ok(SpendSink {
        policy: policy.to_string(),
        rule: rule.to_string(),
        by: dims
            .iter()
            .map(|d| {
                Dimension::parse(d).ok_or_else(|| StoreError::Corrupt(format!("dimension `{d}`")))
            })
            .collect::<Result<_, _>>()?,
        values: parse(vals)?,
    })
}

fn uuid_u128(text: &str) -> Result<u128, StoreError> {
    u128::from_str_radix(&text.replace('-', ""), 16)
        .map_err(|_| StoreError::Corrupt(format!("id `{text}`")))
}

fn json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn policy_row(r: &AnyRow) -> PolicyVersion {
    PolicyVersion {
        version: r.get::<i64, _>(0) as u64,
        source: r.get(1),
        created_at: r.get(2),
        actor: r.get(3),
        reason: r.get(4),
    }
}

async fn insert_audit(
    tx: &mut sqlx::AnyConnection,
    postgres: bool,
    at: i64,
    c: &Change<'_>,
) -> Result<(), StoreError> {
    sqlx::query(dialect(postgres, "INSERT INTO audit (at, actor, action, target, from_value, to_value, reason) VALUES (?, ?, ?, ?, ?, ?, ?)"))
        .bind(at)
        .bind(c.actor)
        .bind(c.action)
        .bind(c.target)
        .bind(&c.from)
        .bind(&c.to)
        .bind(c.reason)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The group-commit writer: every waiting spend record goes into one transaction.
async fn group_commit(
    pool: AnyPool,
    postgres: bool,
    mut rx: mpsc::Receiver<(SpendWrite, WriteReply)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let result = write_batch(&pool, postgres, &batch)
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, records = batch.len(), "spend write failed; the records are not acknowledged");
        }
        for (_, reply) in batch {
            let _ = reply.send(result.clone());
        }
    }
}

async fn write_batch(
    pool: &AnyPool,
    postgres: bool,
    batch: &[(SpendWrite, WriteReply)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    for (w, _) in batch {
        let inserted = sqlx::query(dialect(
            postgres,
            "INSERT INTO spend (decision_id, at, cost, recorded_at) VALUES (?, ?, ?, ?) ON CONFLICT (decision_id) DO NOTHING",
        ))
        .bind(&w.decision)
        .bind(w.at)
        .bind(w.cost)
        .bind(w.recorded_at)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            continue;
        }
        for s in &w.sinks {
            let dims: Vec<String> = s.by.iter().map(ToString::to_string).collect();
            let (dims, vals) = (json(&dims)?, json(&s.values)?);
            sqlx::query(dialect(postgres, "INSERT INTO spend_sinks (decision_id, policy, rule, dims, vals) VALUES (?, ?, ?, ?, ?)"))
                .bind(&w.decision)
                .bind(&s.policy)
                .bind(&s.rule)
                .bind(&dims)
                .bind(&vals)
                .execute(&mut *tx)
                .await?;
            // The later time without MAX/GREATEST, which the two dialects spell apart.
            let add_to_day = dialect(
                postgres,
                "INSERT INTO spend_days (policy, rule, dims, vals, day, cost, last_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (policy, rule, dims, vals, day) DO UPDATE SET cost = spend_days.cost + excluded.cost, last_at = CASE WHEN excluded.last_at > spend_days.last_at THEN excluded.last_at ELSE spend_days.last_at END",
            );
            sqlx::query(add_to_day)
                .bind(&s.policy)
                .bind(&s.rule)
                .bind(&dims)
                .bind(&vals)
                .bind(w.at.div_euclid(DAY_MS))
                .bind(w.cost)
                .bind(w.at)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// How often a follower catches up without a notification, and retries a lost
/// subscription.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The other instances' changes, subscribed to (see [`Store::change_feed`]).
pub struct ChangeFeed {
    store: Store,
    listener: Option<sqlx::postgres::PgListener>,
}

/// Why [`ChangeFeed::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Another instance notified a change.
    Notified,
    /// A second passed without one (the fallback poll).
    Timer,
    /// The subscription was lost and made again; changes may have been missed.
    Resubscribed,
    /// There is nothing to follow (SQLite, one instance).
    Nothing,
}

impl ChangeFeed {
    /// Waits for the next reason to catch up with the store: a notification, a second
    /// without one, or a lost subscription made again (notifications sent meanwhile are
    /// gone, so the caller catches up at once rather than at the next second).
    pub async fn wait(&mut self) -> Wake {
        let Some(listener) = self.listener.as_mut() else {
            return Wake::Nothing;
        };
        tokio::select! {
            n = listener.try_recv() => match n {
                Ok(Some(_)) => Wake::Notified,
                // The connection closed, and sqlx has connected and listened again.
                Ok(None) => {
                    tracing::warn!("the change listener lost its connection and listens again");
                    Wake::Resubscribed
                }
                // The server ended the connection with an error, or connecting again
                // failed: subscribe afresh, retrying every second.
                Err(e) => {
                    tracing::warn!(error = %e, "the change listener lost its connection; reconnecting");
                    self.listener = Some(self.resubscribe().await);
                    Wake::Resubscribed
                }
            },
            () = tokio::time::sleep(FOLLOW_EVERY) => Wake::Timer,
        }
    }

    /// Keeps `engine` on the store's latest policy version and settings, catching up
    /// after every [`wait`](Self::wait). Runs until the process stops; returns at once on
    /// SQLite.
    pub async fn follow(mut self, engine: &Engine) {
        loop {
            let wake = self.wait().await;
            if wake == Wake::Nothing {
                return;
            }
            match self.store.sync(engine).await {
                Ok(true) => tracing::info!(
                    version = engine.policy().version(),
                    ?wake,
                    "picked up a new policy version"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot catch up with the store"),
            }
        }
    }

    /// Subscribes again, retrying every second until it can.
    async fn resubscribe(&self) -> sqlx::postgres::PgListener {
        loop {
            match self.store.listen().await {
                Ok(l) => return l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for changes; retrying");
                    tokio::time::sleep(FOLLOW_EVERY).await;
                }
            }
        }
    }
}
