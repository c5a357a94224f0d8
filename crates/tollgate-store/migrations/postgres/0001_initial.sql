-- Policy versions: the document text as it was submitted, and who, when, why.
CREATE TABLE policy_versions (
    version     BIGINT PRIMARY KEY,
    source      TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    actor       TEXT   NOT NULL,
    reason      TEXT   NOT NULL
);

-- Small facts, such as the hash of the last `--config` file applied.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every change: who, when, what, from, to, why.
CREATE TABLE audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    target      TEXT   NOT NULL,
    from_value  TEXT,
    to_value    TEXT,
    reason      TEXT   NOT NULL
);

CREATE TABLE settings_overrides (
    scope  TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    spec        TEXT   NOT NULL,
    info        TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    seq         BIGSERIAL
);

CREATE TABLE leases (
    id          TEXT PRIMARY KEY,
    resource    TEXT   NOT NULL,
    subject     TEXT   NOT NULL,
    expires_at  BIGINT,
    created_at  BIGINT NOT NULL
);

-- The spend ledger: one row per recorded decision, with the counters it counts toward.
CREATE TABLE spend (
    decision_id  TEXT PRIMARY KEY,
    at           BIGINT NOT NULL,
    cost         BIGINT NOT NULL,
    recorded_at  BIGINT NOT NULL
);

CREATE TABLE spend_sinks (
    decision_id  TEXT NOT NULL REFERENCES spend (decision_id),
    policy       TEXT NOT NULL,
    rule         TEXT NOT NULL,
    dims         TEXT NOT NULL,
    vals         TEXT NOT NULL
);
CREATE INDEX spend_at ON spend (at);
