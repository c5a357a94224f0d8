-- Recorded spend summed by counter and UTC day, kept with every record: a restart gives
-- back older days as one sum each, so it reads what the counters need, not every call
-- ever recorded. `day` is the check time's day since the epoch; `last_at` the latest
-- check time among the day's calls.
CREATE TABLE spend_days (
    policy   TEXT    NOT NULL,
    rule     TEXT    NOT NULL,
    dims     TEXT    NOT NULL,
    vals     TEXT    NOT NULL,
    day      INTEGER NOT NULL,
    cost     INTEGER NOT NULL,
    last_at  INTEGER NOT NULL,
    PRIMARY KEY (policy, rule, dims, vals, day)
);

INSERT INTO spend_days (policy, rule, dims, vals, day, cost, last_at)
SELECT k.policy, k.rule, k.dims, k.vals, (s.at - ((s.at % 86400000) + 86400000) % 86400000) / 86400000,
       SUM(s.cost), MAX(s.at)
FROM spend s JOIN spend_sinks k ON k.decision_id = s.decision_id
GROUP BY 1, 2, 3, 4, 5;
