//! The ledger conformance suite on the in-memory ledger (store backends run it too).

use tollgate::ledger::{MemoryLedger, conformance};

#[test]
fn memory_ledger_conforms() {
    conformance::run_all("memory", &|| Box::new(MemoryLedger::new()));
}

/// Sweeping is invisible: the suite passes with every shard sweeping its idle counters
/// after each plan that commits in it (by default a shard sweeps after thousands).
#[test]
fn memory_ledger_conforms_sweeping_after_every_plan() {
    conformance::run_all("memory, sweeping after every plan", &|| {
        Box::new(MemoryLedger::sweeping_every(0))
    });
}
