//! The state tables (`chat_backfill.runs`, `rejected_messages`, `run_ranges`) belong to the
//! extension's owner, so that its pg_dump and pg_restore carry them; every role that
//! backfills writes them with its own rights. Whatever their owner attaches to them (a
//! trigger, a rule, a default, a constraint, a policy, a child table; any of them able to
//! call any function, `query_to_xml` running SQL from a string included) would run with the
//! rights of that role: a superuser's backfill of its own tables would run the owner's code
//! as superuser. So before each transaction of a backfill touches the state, unless the
//! owner could act as the caller anyway, the caller takes the tables' ROW EXCLUSIVE lock (no
//! trigger, rule, policy or default can be added until the transaction ends) and compares,
//! with a snapshot taken after the lock, what the tables are made of
//! (`chat_backfill.state_definition()`, sql/guard.sql) with what the install or the latest
//! update recorded in a table only a superuser can write. Any difference refuses (42501):
//! no list of harmless functions to get wrong.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE;

use crate::error::{Error, Result};

extension_sql_file!("../sql/guard.sql", name = "state_guard", finalize);

/// Whether the check applies: the extension's owner, or the owner of anything in its schema,
/// cannot act as the calling role. Decided from the extension and every relation of the
/// schema, whatever its kind: a state table the owner turned into a view must not make
/// the check go away.
const NEEDED: &str = "\
    SELECT NOT pg_catalog.pg_has_role(e.extowner, CURRENT_USER, 'USAGE'::pg_catalog.text) \
           OR EXISTS (SELECT FROM pg_catalog.pg_class c \
                       WHERE c.relnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid \
                         AND NOT pg_catalog.pg_has_role(c.relowner, CURRENT_USER, 'USAGE'::pg_catalog.text)) \
      FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.name";

/// What the backfill writes and reads by name in the schema, to lock (tables, and anything a
/// table became).
const LOCKED: &str = "\
    SELECT c.oid FROM pg_catalog.pg_class c \
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid \
       AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v', 'm', 'f']::pg_catalog.\"char\"[]) \
     ORDER BY c.oid";

/// The parts of the state tables' definition that are not in the recorded one (none when they
/// are unchanged), and whether anything recorded is missing.
const CHANGED: &str = "\
    WITH present AS MATERIALIZED (SELECT d.part FROM chat_backfill.state_definition() AS d (part)) \
    SELECT (SELECT pg_catalog.array_agg(n.part ORDER BY n.part) FROM present n \
             WHERE NOT EXISTS (SELECT FROM chat_backfill.state_recorded r WHERE r.part OPERATOR(pg_catalog.=) n.part)), \
           EXISTS (SELECT FROM chat_backfill.state_recorded r \
                    WHERE NOT EXISTS (SELECT FROM present n WHERE n.part OPERATOR(pg_catalog.=) r.part))";

/// Refuses (42501) when the state tables carry code of their owner's that would run with the
/// caller's rights; locks them against new such code until the transaction ends.
pub fn check() -> Result<()> {
    if !crate::read_only::get_one::<bool>(NEEDED, &[])?.unwrap_or(true) {
        return Ok(());
    }
    let tables = Spi::connect(|client| {
        let mut tables = Vec::new();
        for row in client.select(LOCKED, None, &[])? {
            tables.extend(row.get::<pg_sys::Oid>(1)?);
        }
        Ok::<_, pgrx::spi::Error>(tables)
    })?;
    for &table in &tables {
        // SAFETY: an ordinary, interruptible lock on an existing relation, released at the end
        // of the transaction; ROW EXCLUSIVE is what the backfill's own writes take anyway.
        unsafe { pg_sys::LockRelationOid(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
    }
    // The statement's snapshot may predate the lock wait (or the transaction's, in REPEATABLE
    // READ): a change committed while this waited would go unseen, yet the writes would use it.
    // SAFETY: a new snapshot pushed as the active one for the lookup below, popped right after
    // it, on its error path too (the subtransaction's abort pops it otherwise).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let changed = Spi::connect(|client| {
        let table = client.select(CHANGED, Some(1), &[])?;
        let row = table.first();
        Ok::<_, pgrx::spi::Error>((row.get::<Vec<String>>(1)?.unwrap_or_default(), row.get::<bool>(2)?.unwrap_or(false)))
    });
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    let (added, removed) = changed?;
    if added.is_empty() && !removed {
        return Ok(());
    }
    let what = match added.first() {
        Some(part) => format!("now it has {}", part.chars().take(300).collect::<String>()),
        None => "something recorded is gone".to_owned(),
    };
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("chat_backfill: the extension's state tables are not as its install or update made them ({} change{}; \
                 {what}): what was added would run with your rights",
                added.len().max(1), if added.len() > 1 { "s" } else { "" }),
        "Their owner (the extension's owner) changed them: undo it, or run the backfill as that role. After a \
         pg_upgrade the recorded definition may read differently: a superuser who has checked the tables records \
         them again with SELECT chat_backfill.record_state_definition().",
    ))
}
