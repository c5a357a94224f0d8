-- A replay reads the counters of the calls since a time (spend_at, then this index):
-- without it, it read every counter row ever written to find them.
CREATE INDEX spend_sinks_decision ON spend_sinks (decision_id);
