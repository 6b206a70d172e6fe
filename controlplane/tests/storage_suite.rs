//! openraft's storage conformance suite against the SQLite log store and state machine.

#![allow(clippy::unwrap_used, missing_docs)]

use boxd_controlplane::raft::log_store::LogStore;
use boxd_controlplane::raft::state_machine::StateMachine;
use boxd_controlplane::raft::{StoreError, TypeConfig};
use boxd_controlplane::view::ViewHandle;
use openraft::testing::{StoreBuilder, Suite};

struct SqliteBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SqliteBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft-log.db")).expect("open log");
        let sm = StateMachine::open(dir.path(), ViewHandle::new()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(SqliteBuilder) {
        panic!("storage suite failed: {e}");
    }
}
