//! Any JSON array of commands applied in order to a fresh replica: apply never panics, a
//! refused command leaves every table exactly as it was, and the same commands applied as one
//! batch (`Applier::apply_batch`) give the same answers and the same tables.
#![no_main]

use boxd_controlplane::command::Command;
use boxd_controlplane::store::apply::Applier;
use boxd_controlplane::store::schema;
use libfuzzer_sys::fuzz_target;

fn digest(c: &rusqlite::Connection) -> String {
    let mut out = String::new();
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("list tables");
    for t in tables {
        let mut stmt = c
            .prepare(&format!("SELECT * FROM {t} ORDER BY 1"))
            .expect("select");
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i)))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .expect("rows");
        for row in rows {
            out.push_str(&row.expect("row"));
            out.push('\n');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(cmds) = serde_json::from_slice::<Vec<Command>>(data) else {
        return;
    };
    let cmds = &cmds[..cmds.len().min(64)];
    let c = rusqlite::Connection::open_in_memory().expect("sqlite");
    schema::migrate(&c).expect("schema");
    let mut answers = Vec::new();
    for cmd in cmds {
        let before = digest(&c);
        let r = Applier::default()
            .apply(&c, cmd)
            .expect("storage never fails in memory");
        if r.is_err() {
            assert_eq!(before, digest(&c), "refused {cmd:?} changed state");
        }
        answers.push(r);
    }
    // The same commands as one batch (one savepoint, redone one by one on a refusal) answer
    // and end the same.
    let b = rusqlite::Connection::open_in_memory().expect("sqlite");
    schema::migrate(&b).expect("schema");
    let batched = Applier::default()
        .apply_batch(&b, cmds)
        .expect("storage never fails in memory");
    assert_eq!(batched, answers, "a batch answered differently");
    assert_eq!(digest(&b), digest(&c), "a batch ended differently");
});
