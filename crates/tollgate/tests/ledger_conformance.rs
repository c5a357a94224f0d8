//! The ledger conformance suite on the in-memory ledger (store backends run it too).

use tollgate::ledger::{MemoryLedger, conformance};

#[test]
fn memory_ledger_conforms() {
    conformance::run_all("memory", &|| Box::new(MemoryLedger::new()));
}
