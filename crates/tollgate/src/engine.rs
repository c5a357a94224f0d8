//! The engine: a policy set behind an atomic pointer, a clock, a ledger, settings
//! overrides and runs. Every public operation of the library goes through here.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::clock::{Clock, SystemClock};
use crate::decision::{Code, Decision, DecisionId, Name, Names, RemainingByRule};
use crate::duration::Millis;
use crate::eval::{self, CheckOptions, DecisionSettings, Inputs};
use crate::ledger::{Ledger, LedgerError, MemoryLedger, RecordOutcome};
use crate::money::Micros;
use crate::policy::PolicySet;
use crate::policy::diag::PolicyErrors;
use crate::request::{Request, Subject};
use crate::rules::budget::{Budget, OnExceeded};
use crate::rules::custom::Registry;
use crate::rules::{CustomRule, Mode, Rule, RuleKind};
use crate::settings::{EffectiveSetting, Overrides, Scope};

/// What can go wrong outside a decision.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A `record` named a decision id that is not an id at all.
    #[error("`{0}` is not a decision id")]
    BadDecisionId(String),
    /// A `record` with a negative cost (spend only grows) or one over
    /// [`Micros::MAX_RECORDED`].
    #[error("`cost_usd` must be between 0 and {max} (got {0})", max = Micros::MAX_RECORDED)]
    CostOutOfRange(Micros),
    /// A lease id that is not an id at all.
    #[error("`{0}` is not a lease id")]
    BadLeaseId(String),
    /// No such run.
    #[error("unknown run `{0}`")]
    UnknownRun(String),
    /// A run with this id exists already.
    #[error("run `{0}` exists already")]
    RunExists(String),
    /// A run was described wrongly.
    #[error("invalid run: {0}")]
    InvalidRun(String),
    /// A settings override was refused; nothing changed.
    #[error("{0}")]
    InvalidSetting(String),
    /// The policy document was refused; nothing changed.
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A request to create a run.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The run id (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
    /// Selects the settings the run snapshots (checks are matched on their own subject).
    #[serde(default)]
    pub subject: Subject,
    /// A `total` budget over all the run's calls.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "2.50"))]
    pub budget_usd: Option<Micros>,
    /// `reject` (default), `alert` or `downgrade`.
    #[serde(default)]
    pub on_exceeded: Option<String>,
    /// The model to use once the budget is exhausted (with `on_exceeded: downgrade`).
    #[serde(default)]
    pub downgrade_to: Option<String>,
    /// Alert when this fraction of the budget is used.
    #[serde(default)]
    pub alert_at: Option<f64>,
    /// The parent run: this run's spend counts toward every ancestor's budget.
    #[serde(default)]
    pub parent: Option<String>,
}

/// A created run, as reported to callers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run id.
    pub id: String,
    /// The policy version frozen at creation.
    pub policy_version: u64,
    /// The settings frozen at creation (source `run:<id>`).
    pub settings: BTreeMap<String, EffectiveSetting>,
    /// The run's budget, if any.
    pub budget_usd: Option<Micros>,
    /// The parent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

struct Run {
    info: RunInfo,
    policy: Arc<PolicySet>,
    budget: Option<Rule>,
    parent: Option<Arc<Run>>,
}

/// One row of the usage summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageItem {
    /// The policy (or `run:<id>`).
    pub policy: String,
    /// The rule.
    pub rule: String,
    /// The counter, e.g. `user=u42`.
    pub key: String,
    /// Start of the current period or window (RFC 3339), null for `total`.
    pub period_start: Option<String>,
    /// The limit.
    pub limit_usd: Micros,
    /// Recorded spend in the period.
    pub spent_usd: Micros,
    /// Live reservations in the period.
    pub reserved_usd: Micros,
    /// What is left.
    pub remaining_usd: Micros,
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    clock: Arc<dyn Clock>,
    ledger: Arc<dyn Ledger>,
    custom: Registry,
}

impl EngineBuilder {
    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The ledger (default: a new in-memory ledger).
    pub fn ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// Registers a custom rule type, usable in policies as `type: <name>`.
    pub fn custom_rule(mut self, name: &str, rule: impl CustomRule + 'static) -> Self {
        self.custom.insert(name.to_string(), Arc::new(rule));
        self
    }

    /// Compiles a policy document (with the registered custom rules) and builds the engine.
    pub fn build_from_text(self, text: &str) -> Result<Engine, PolicyErrors> {
        let set = PolicySet::compile_with(text, &self.custom)?;
        Ok(self.build(set))
    }

    /// Builds the engine on a compiled set, which becomes version 1.
    pub fn build(self, set: PolicySet) -> Engine {
        Engine {
            policy: ArcSwap::from_pointee(set.with_version(1)),
            version: Mutex::new(1),
            clock: self.clock,
            ledger: self.ledger,
            custom: self.custom,
            overrides: ArcSwap::from_pointee(Overrides::default()),
            overrides_writer: Mutex::new(()),
            runs: RwLock::new(HashMap::new()),
            salt: uuid::Uuid::new_v4().as_u128(),
        }
    }
}

/// A number never returned before in this process. Each thread takes blocks of them
/// from one shared counter, so a decision touches no shared cache line for its id.
fn sequence() -> u64 {
    const BLOCK: u64 = 1 << 20;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
    thread_local!(static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) });
    RANGE.with(|range| {
        let (mut next, mut end) = range.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        range.set((next + 1, end));
        next
    })
}

/// The decision point.
pub struct Engine {
    policy: ArcSwap<PolicySet>,
    version: Mutex<u64>,
    clock: Arc<dyn Clock>,
    ledger: Arc<dyn Ledger>,
    custom: Registry,
    /// Read on every decision without a lock; changed by copy under `overrides_writer`.
    overrides: ArcSwap<Overrides>,
    overrides_writer: Mutex<()>,
    runs: RwLock<HashMap<String, Arc<Run>>>,
    salt: u128,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.policy.load().version)
            .finish()
    }
}

impl Engine {
    /// A builder with the system clock and an in-memory ledger.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            clock: Arc::new(SystemClock),
            ledger: Arc::new(MemoryLedger::new()),
            custom: Registry::default(),
        }
    }

    /// The current policy set.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy.load_full()
    }

    /// The engine's clock, in milliseconds since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Compiles and installs a new policy document; returns its version.
    /// On error nothing changes.
    pub fn replace_policy(&self, text: &str) -> Result<u64, PolicyErrors> {
        let set = PolicySet::compile_with(text, &self.custom)?;
        Ok(self.install(set))
    }

    /// Installs a compiled set as the next version.
    pub fn install(&self, set: PolicySet) -> u64 {
        let mut version = self.version.lock();
        *version += 1;
        self.policy.store(Arc::new(set.with_version(*version)));
        *version
    }

    /// Compiles a parsed document (a scenario's inline policy) with this engine's custom rules.
    pub(crate) fn compile_tree(&self, root: &crate::yaml::Node) -> Result<PolicySet, PolicyErrors> {
        PolicySet::compile_tree(root, &self.custom)
    }

    /// Compiles a document with this engine's custom rules, without installing it.
    pub fn compile(&self, text: &str) -> Result<PolicySet, PolicyErrors> {
        PolicySet::compile_with(text, &self.custom)
    }

    fn next_id(&self, now: i64) -> u128 {
        // UUIDv7 layout: the clock's milliseconds, then this engine's random salt XOR a
        // counter. XOR with a constant is a bijection, so ids never repeat within an
        // engine, and the 74 random bits keep engines apart. No syscall per decision.
        let seq = u128::from(sequence());
        let ts = (now.max(0) as u128) & ((1 << 48) - 1);
        let rand = (self.salt ^ seq) & ((1 << 74) - 1);
        let (rand_a, rand_b) = (rand >> 62, rand & ((1 << 62) - 1));
        (ts << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    }

    /// Decides a request (and counts it when allowed).
    pub fn check(&self, request: &Request) -> Decision {
        self.decide(request, CheckOptions::default())
    }

    /// Decides a request and fills `trace`.
    pub fn check_explained(&self, request: &Request) -> Decision {
        self.decide(
            request,
            CheckOptions {
                explain: true,
                ..CheckOptions::default()
            },
        )
    }

    /// A check that also takes a lease on `request.resource` (quota rules apply);
    /// `ttl` lets a crashed holder's slot come back on its own.
    pub fn acquire(&self, request: &Request, ttl: Option<Millis>, explain: bool) -> Decision {
        let now = self.clock.now_ms();
        self.decide(
            request,
            CheckOptions {
                acquire: true,
                explain,
                lease_expires_at: ttl.map(|t| now.saturating_add(t.0)),
            },
        )
    }

    fn decide(&self, request: &Request, options: CheckOptions) -> Decision {
        let now = self.clock.now_ms();
        let decision_id = self.next_id(now);
        let run = match &request.subject.run {
            None => None,
            Some(id) => match self.runs.read().get(id) {
                Some(run) => Some(Arc::clone(run)),
                None => return self.unknown_run(request, id, decision_id),
            },
        };
        let current;
        let overrides;
        let (set, settings): (&PolicySet, _) = match &run {
            Some(run) => (
                &run.policy,
                DecisionSettings::Frozen(run.info.settings.clone()),
            ),
            None => {
                current = self.policy.load();
                if current.declares_settings() {
                    overrides = self.overrides.load();
                    (&current, DecisionSettings::Live(&overrides))
                } else {
                    // No setting to resolve: the overrides need not be read (a load
                    // is ≈ 100 instructions a decision).
                    (&current, DecisionSettings::Frozen(BTreeMap::new()))
                }
            }
        };
        let mut run_rules = Vec::new();
        let mut cursor = run.as_deref();
        while let Some(r) = cursor {
            if let Some(rule) = &r.budget {
                run_rules.push(rule);
            }
            cursor = r.parent.as_deref();
        }
        eval::decide(
            set,
            request,
            Inputs {
                ledger: &*self.ledger,
                now,
                decision_id,
                lease_id: if options.acquire {
                    self.next_id(now)
                } else {
                    0
                },
                run_rules,
                settings,
            },
            options,
        )
    }

    fn unknown_run(&self, request: &Request, id: &str, decision_id: u128) -> Decision {
        let set = self.policy.load();
        Decision {
            allowed: false,
            code: Code::PolicyDenied,
            reason: Some(format!(
                "unknown run `{id}`: create it with POST /v1/runs first"
            )),
            policy: None,
            rule: None,
            policy_version: set.version,
            matched_policies: Names::new(),
            model: request.model.as_deref().map(Name::from),
            guardrails: Names::new(),
            settings: BTreeMap::new(),
            alerts: Vec::new(),
            retry_after_ms: None,
            decision_id: DecisionId::from_u128(decision_id),
            remaining: RemainingByRule::default(),
            trace: Vec::new(),
            lease_id: None,
        }
    }

    fn resolve_settings(
        &self,
        set: &PolicySet,
        request: &Request,
    ) -> BTreeMap<String, EffectiveSetting> {
        if set.settings.is_empty() {
            return BTreeMap::new();
        }
        let order = set.evaluation_order(&set.matcher.matched(request));
        set.resolve_settings(&order, &self.overrides.load(), &request.subject)
    }

    /// Every effective setting for a subject, each with its source; a subject naming a
    /// run gets the run's snapshot.
    pub fn settings(
        &self,
        subject: &Subject,
    ) -> Result<BTreeMap<String, EffectiveSetting>, EngineError> {
        if let Some(id) = &subject.run {
            let runs = self.runs.read();
            let run = runs
                .get(id)
                .ok_or_else(|| EngineError::UnknownRun(id.clone()))?;
            return Ok(run.info.settings.clone());
        }
        let request = Request {
            subject: subject.clone(),
            ..Request::default()
        };
        Ok(self.resolve_settings(&self.policy.load(), &request))
    }

    /// Checks an override without applying it; returns the value normalised.
    pub fn check_setting(&self, scope: &str, key: &str, value: &Json) -> Result<Json, EngineError> {
        Scope::parse(scope).map_err(EngineError::InvalidSetting)?;
        let set = self.policy.load();
        let def = set.settings.get(key).ok_or_else(|| {
            EngineError::InvalidSetting(format!(
                "unknown setting `{key}` (the policy's `settings` does not define it)"
            ))
        })?;
        def.check(value).map_err(EngineError::InvalidSetting)
    }

    /// Sets an override; the value is checked against the key's type and bounds.
    /// Returns the previous value at that scope.
    pub fn set_setting(
        &self,
        scope: &str,
        key: &str,
        value: Json,
    ) -> Result<Option<Json>, EngineError> {
        let value = self.check_setting(scope, key, &value)?;
        let scope = Scope::parse(scope).map_err(EngineError::InvalidSetting)?;
        Ok(self.change_overrides(|o| o.set(scope, key.to_string(), value)))
    }

    /// Replaces every override at once (an instance catching up with a shared store);
    /// entries that no longer validate are skipped.
    pub fn replace_overrides(&self, overrides: Vec<(String, String, Json)>) {
        let mut fresh = Overrides::default();
        for (scope, key, value) in overrides {
            if let (Ok(s), Ok(v)) = (
                Scope::parse(&scope),
                self.check_setting(&scope, &key, &value),
            ) {
                fresh.set(s, key, v);
            }
        }
        self.change_overrides(|o| *o = fresh);
    }

    /// The override at exactly `scope`, if any.
    pub fn setting_override(&self, scope: &str, key: &str) -> Option<Json> {
        let scope = Scope::parse(scope).ok()?;
        self.overrides.load().get(&scope, key).cloned()
    }

    /// Removes an override; returns the removed value (`None`: there was none).
    pub fn remove_setting(&self, scope: &str, key: &str) -> Result<Option<Json>, EngineError> {
        let scope = Scope::parse(scope).map_err(EngineError::InvalidSetting)?;
        Ok(self.change_overrides(|o| o.remove(&scope, key)))
    }

    /// Changes a copy of the overrides and publishes it; writers take turns.
    fn change_overrides<T>(&self, change: impl FnOnce(&mut Overrides) -> T) -> T {
        let _writer = self.overrides_writer.lock();
        let mut copy = Overrides::clone(&self.overrides.load());
        let out = change(&mut copy);
        self.overrides.store(Arc::new(copy));
        out
    }

    /// Every override, as (scope, key, value).
    pub fn overrides(&self) -> Vec<(String, String, Json)> {
        self.overrides
            .load()
            .iter()
            .map(|(s, k, v)| (s.to_string(), k.clone(), v.clone()))
            .collect()
    }

    /// Replaces a decision's reservations by its actual cost (idempotent). A cost below 0
    /// or over [`Micros::MAX_RECORDED`] is refused, as over HTTP: nothing is recorded.
    pub fn record(&self, decision_id: &str, cost: Micros) -> Result<RecordOutcome, EngineError> {
        let id = uuid::Uuid::parse_str(decision_id)
            .map_err(|_| EngineError::BadDecisionId(decision_id.to_string()))?;
        if cost.unrecordable().is_some() {
            return Err(EngineError::CostOutOfRange(cost));
        }
        Ok(self
            .ledger
            .record(id.as_u128(), cost, self.clock.now_ms())?)
    }

    /// Releases a lease; `false` when there is no such live lease.
    pub fn release(&self, lease_id: &str) -> Result<bool, EngineError> {
        let id = uuid::Uuid::parse_str(lease_id)
            .map_err(|_| EngineError::BadLeaseId(lease_id.to_string()))?;
        Ok(self.ledger.release(id.as_u128(), self.clock.now_ms())?)
    }

    /// Creates a run: freezes the current policy version and the subject's settings.
    pub fn create_run(&self, spec: RunSpec) -> Result<RunInfo, EngineError> {
        let now = self.clock.now_ms();
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::from_u128(self.next_id(now)).to_string());
        if id.is_empty() {
            return Err(EngineError::InvalidRun("`id` must not be empty".into()));
        }
        let budget = run_budget(&spec, &id)?;
        let mut runs = self.runs.write();
        if runs.contains_key(&id) {
            return Err(EngineError::RunExists(id));
        }
        let parent = match &spec.parent {
            None => None,
            Some(p) => Some(Arc::clone(
                runs.get(p)
                    .ok_or_else(|| EngineError::UnknownRun(p.clone()))?,
            )),
        };
        let policy = self.policy.load_full();
        let request = Request {
            subject: Subject {
                run: None,
                ..spec.subject.clone()
            },
            ..Request::default()
        };
        let source = format!("run:{id}");
        let settings = self
            .resolve_settings(&policy, &request)
            .into_iter()
            .map(|(k, s)| {
                (
                    k,
                    EffectiveSetting {
                        value: s.value,
                        source: source.clone(),
                    },
                )
            })
            .collect();
        let info = RunInfo {
            id: id.clone(),
            policy_version: policy.version,
            settings,
            budget_usd: spec.budget_usd,
            parent: spec.parent.clone(),
        };
        runs.insert(
            id,
            Arc::new(Run {
                info: info.clone(),
                policy,
                budget,
                parent,
            }),
        );
        Ok(info)
    }

    /// Restores a run from a store: its snapshot as it was created, on the policy set of
    /// its version. Parents must be restored first.
    pub fn restore_run(
        &self,
        spec: &RunSpec,
        info: RunInfo,
        policy: PolicySet,
    ) -> Result<(), EngineError> {
        let budget = run_budget(spec, &info.id)?;
        let mut runs = self.runs.write();
        let parent = match &info.parent {
            None => None,
            Some(p) => Some(Arc::clone(
                runs.get(p)
                    .ok_or_else(|| EngineError::UnknownRun(p.clone()))?,
            )),
        };
        let policy = Arc::new(policy.with_version(info.policy_version));
        runs.insert(
            info.id.clone(),
            Arc::new(Run {
                info,
                policy,
                budget,
                parent,
            }),
        );
        Ok(())
    }

    /// Installs a compiled set under a given version number (restoring from a store).
    pub fn install_version(&self, set: PolicySet, version: u64) {
        let mut current = self.version.lock();
        *current = (*current).max(version);
        self.policy.store(Arc::new(set.with_version(version)));
    }

    /// A run's snapshot.
    pub fn run(&self, id: &str) -> Option<RunInfo> {
        self.runs.read().get(id).map(|r| r.info.clone())
    }

    /// The earliest check time (midnight UTC) from which a store must give back
    /// recorded spend call by call, at exact times ([`Restore::restore_spend`]): every
    /// trailing window of the policy and of the runs' snapshots lies after it, and so
    /// does every check that may still be recorded (twice the reservation TTL), with a
    /// day to spare. Spend checked before it may come back as one sum a counter and day
    /// ([`Restore::restore_spend_day`]), which is all a calendar period or `total` reads.
    /// A window lengthened by a later policy edit reads such sums at their latest time:
    /// never less than was spent.
    ///
    /// [`Restore::restore_spend`]: crate::ledger::Restore::restore_spend
    /// [`Restore::restore_spend_day`]: crate::ledger::Restore::restore_spend_day
    pub fn exact_spend_since(&self, now: i64) -> i64 {
        const DAY: i64 = Millis::DAY.0;
        let (set, runs) = (self.policy.load(), self.runs.read());
        let longest = std::iter::once(&**set)
            .chain(runs.values().map(|run| &*run.policy))
            .map(|p| {
                p.longest_trailing_spend_window_ms()
                    .max(2 * p.reservation_ttl_ms())
            })
            .max()
            .unwrap_or(0);
        now.saturating_sub(longest)
            .saturating_sub(DAY)
            .div_euclid(DAY)
            .saturating_mul(DAY)
    }

    /// Spend counters (budgets, cost velocity, run budgets) with their limit, spend,
    /// reservations and what is left; only those keyed by `dimension=value` when given.
    pub fn usage(&self, filter: Option<(&str, &str)>) -> Result<Vec<UsageItem>, EngineError> {
        let now = self.clock.now_ms();
        let set = self.policy.load();
        let runs = self.runs.read();
        let rule_of = |policy: &str, rule: &str| -> Option<&Rule> {
            match policy.strip_prefix("run:") {
                Some(run) => runs.get(run)?.budget.as_ref(),
                None => set.rule(policy, rule),
            }
        };
        let window_of = |policy: &str, rule: &str| match &rule_of(policy, rule)?.kind {
            RuleKind::Budget(b) => Some(b.window_start(now)),
            RuleKind::CostVelocity(c) => Some(c.window_start(now)),
            _ => None,
        };
        let rows = self.ledger.spend_usage(filter, now, &window_of)?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let rule = rule_of(&row.policy, &row.rule)?;
                let (limit, start) = match &rule.kind {
                    RuleKind::Budget(b) => (
                        b.limit_for_value(row.first_value.as_deref()),
                        b.window_start(now),
                    ),
                    RuleKind::CostVelocity(c) => (c.limit(), c.window_start(now)),
                    _ => return None,
                };
                let used = row.spent.saturating_add(row.reserved);
                Some(UsageItem {
                    policy: row.policy,
                    rule: row.rule,
                    key: row.key,
                    period_start: (start != i64::MIN).then(|| rfc3339(start)),
                    limit_usd: limit,
                    spent_usd: row.spent,
                    reserved_usd: row.reserved,
                    remaining_usd: Micros(limit.0.saturating_sub(used.0).max(0)),
                })
            })
            .collect())
    }
}

/// Checks a run's budget fields and builds its budget rule.
fn run_budget(spec: &RunSpec, id: &str) -> Result<Option<Rule>, EngineError> {
    let on_exceeded = match spec.on_exceeded.as_deref() {
        None | Some("reject") => OnExceeded::Reject,
        Some("alert") => OnExceeded::Alert,
        Some("downgrade") => OnExceeded::Downgrade,
        Some(other) => {
            return Err(EngineError::InvalidRun(format!(
                "`on_exceeded` is reject, alert or downgrade, not `{other}`"
            )));
        }
    };
    if (on_exceeded == OnExceeded::Downgrade) != spec.downgrade_to.is_some() {
        return Err(EngineError::InvalidRun(
            "`downgrade_to` goes with `on_exceeded: downgrade`, and only with it".into(),
        ));
    }
    if spec.alert_at.is_some_and(|a| !(a > 0.0 && a <= 1.0)) {
        return Err(EngineError::InvalidRun(
            "`alert_at` is a fraction in (0, 1]".into(),
        ));
    }
    if spec.budget_usd.is_some_and(|b| b.0 < 0) {
        return Err(EngineError::InvalidRun(
            "`budget_usd` must not be negative".into(),
        ));
    }
    if spec.budget_usd.is_none() && (spec.on_exceeded.is_some() || spec.alert_at.is_some()) {
        return Err(EngineError::InvalidRun(
            "`on_exceeded` and `alert_at` need a `budget_usd`".into(),
        ));
    }
    Ok(spec.budget_usd.map(|limit| {
        Rule::new(
            "budget".into(),
            format!("run:{id}"),
            None,
            Mode::Enforce,
            RuleKind::Budget(Budget::for_run(
                limit,
                on_exceeded,
                spec.downgrade_to.clone(),
                spec.alert_at,
            )),
        )
    }))
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
