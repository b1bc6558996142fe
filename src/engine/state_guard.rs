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
//!
//! That protects every backfill, but not a superuser who reads the state directly (a state
//! table turned into a view runs its owner's function for whoever selects from it, and 14
//! and 15 still allow `CREATE RULE "_RETURN"` on a table), nor the superuser's own
//! `launches`, which a cascade from `runs` reaches. So two event triggers the install
//! creates (as the bootstrap superuser, out of the owner's reach) bracket every DDL command
//! of a role that is not a superuser: one notes the definition before the command, the other
//! refuses (42501, rolling the command back) when the command changed it and it no longer
//! matches the record. Comparing before with after, not after with the record alone, keeps a
//! stale record (a pg_upgrade, a superuser's own change) from refusing every other DDL in
//! the database.

use std::cell::RefCell;

use pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{register_xact_callback, PgXactCallbackEvent};

use crate::pg::error::{Error, Result};

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
    if !crate::pg::read_only::get_one::<bool>(NEEDED, &[])?.unwrap_or(true) {
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

/// The definition as one text in a fixed order, and the recorded one: what a DDL command is
/// compared on.
const DEFINITION_TEXT: &str = "\
    SELECT pg_catalog.string_agg(d.part, E'\\n'::pg_catalog.text ORDER BY d.part COLLATE pg_catalog.\"C\") \
      FROM chat_backfill.state_definition() AS d (part)";
const RECORDED_TEXT: &str = "\
    SELECT pg_catalog.string_agg(r.part, E'\\n'::pg_catalog.text ORDER BY r.part COLLATE pg_catalog.\"C\") \
      FROM chat_backfill.state_recorded r";

thread_local! {
    /// The definition each DDL command in progress found when it started, innermost last, with
    /// the subtransaction it started in: a command that failed never reached its end, and its
    /// entry is left above the one of the command enclosing it, in a later subtransaction.
    static BEFORE: RefCell<Vec<(pg_sys::SubTransactionId, String)>> = const { RefCell::new(Vec::new()) };
    /// Whether this transaction's abort is set to clear `BEFORE`. Not its commit: CREATE INDEX
    /// CONCURRENTLY, DROP INDEX CONCURRENTLY and DETACH PARTITION CONCURRENTLY commit in the
    /// middle of the command, and their end must still find what their start noted.
    static CLEARED_ON_ABORT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

thread_local! {
    /// `DEFINITION_TEXT` planned once per backend: planned afresh it costs about 4 ms, twice
    /// for each DDL command of the database; from a kept plan about 0.6 ms. Leaked on purpose:
    /// freeing a plan while the process exits is not safe.
    static DEFINITION_PLAN: std::cell::Cell<Option<&'static OwnedPreparedStatement>> = const { std::cell::Cell::new(None) };
}

/// Runs `query` (one text value; `DEFINITION_TEXT` from its kept plan) with a snapshot that
/// sees everything this transaction did so far, the command being watched included.
fn text_now(query: &'static str) -> Result<String> {
    // SAFETY: a new snapshot pushed as the active one for the lookup below and popped right
    // after it (an error aborts the transaction, whose cleanup pops it).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let text = Spi::connect(|client| {
        if query != DEFINITION_TEXT {
            return client.select(query, Some(1), &[])?.first().get_one::<String>();
        }
        let plan = match DEFINITION_PLAN.get() {
            Some(plan) => plan,
            None => {
                let plan: &'static OwnedPreparedStatement = Box::leak(Box::new(client.prepare(query, &[])?.keep()));
                DEFINITION_PLAN.set(Some(plan));
                plan
            }
        };
        client.select(plan, Some(1), &[])?.first().get_one::<String>()
    });
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    Ok(text?.unwrap_or_default())
}

/// Whether DDL by the current role is watched: a superuser may change the state tables (and
/// then records them again); nobody else may.
pub(crate) fn watched() -> bool {
    // SAFETY: reads the current user's superuser flag from the syscache.
    !unsafe { pg_sys::superuser() }
}

/// Refuses, before any of it commits, a `DROP INDEX CONCURRENTLY` of an index of the state
/// tables (`tree`: the command's parse tree, as the start trigger is handed it). Its end
/// would refuse it too, but only after its first transactions committed the index as not
/// valid and not ready, which the rollback of its last leaves so: a unique index no longer
/// enforced, and no change a name-keyed definition shows (the seventh review).
pub(crate) fn refuse_concurrent_drop(tree: *mut pg_sys::Node) -> Result<()> {
    // SAFETY: `tree` is the parse tree of the command being run (or null), read only; the
    // names are resolved without a lock, as a lookup of what the command names.
    let state_index = unsafe {
        if tree.is_null() || !pgrx::is_a(tree, pg_sys::NodeTag::T_DropStmt) {
            return Ok(());
        }
        let stmt = tree.cast::<pg_sys::DropStmt>();
        if !(*stmt).concurrent || (*stmt).removeType != pg_sys::ObjectType::OBJECT_INDEX {
            return Ok(());
        }
        let schema = pg_sys::get_namespace_oid(c"chat_backfill".as_ptr(), true);
        pgrx::PgList::<pg_sys::List>::from_pg((*stmt).objects).iter_ptr().any(|name| {
            let relation = pg_sys::makeRangeVarFromNameList(name);
            let index = pg_sys::RangeVarGetRelidExtended(
                relation,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            index != pg_sys::InvalidOid && pg_sys::get_rel_namespace(index) == schema
        })
    };
    if !state_index {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        "chat_backfill: only a superuser may drop an index of the extension's state tables",
        "Backfills by other roles, and superusers reading chat_backfill.status or rejected_messages, trust them as \
         the install made them. A superuser can make the change and then record it with SELECT \
         chat_backfill.record_state_definition().",
    ))
}

pub(crate) fn note_before() -> Result<()> {
    let before = text_now(DEFINITION_TEXT)?;
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    BEFORE.with_borrow_mut(|stack| stack.push((subxact, before)));
    if !CLEARED_ON_ABORT.get() {
        // A command that failed never reached its end: what its transaction noted goes with
        // it. A command whose end did not fire in a transaction that committed (its event
        // trigger dropped, with the extension, by the command) leaves an entry below every
        // later one, which their own ends never reach.
        CLEARED_ON_ABORT.set(true);
        for event in [PgXactCallbackEvent::Abort, PgXactCallbackEvent::Prepare] {
            register_xact_callback(event, || {
                BEFORE.with_borrow_mut(Vec::clear);
                CLEARED_ON_ABORT.set(false);
            });
        }
        register_xact_callback(PgXactCallbackEvent::Commit, || CLEARED_ON_ABORT.set(false));
    }
    Ok(())
}

pub(crate) fn refuse_changes() -> Result<()> {
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let before = BEFORE.with_borrow_mut(|stack| {
        while stack.last().is_some_and(|(started_in, _)| *started_in > subxact) {
            stack.pop();
        }
        stack.pop().map(|(_, before)| before)
    });
    let after = text_now(DEFINITION_TEXT)?;
    if before.as_deref() == Some(after.as_str()) {
        return Ok(());
    }
    // No start seen (the triggers were created by this very command: an update of the
    // extension), or a change: what is there must be what a superuser recorded.
    let recorded = text_now(RECORDED_TEXT)?;
    if after == recorded {
        return Ok(());
    }
    let new_part = after.lines().find(|part| !recorded.lines().any(|r| r == *part));
    let what = match new_part {
        Some(part) => format!("it would have {}", part.chars().take(300).collect::<String>()),
        None => "something recorded would be gone".to_owned(),
    };
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("chat_backfill: only a superuser may change what the extension's state tables are made of ({what})"),
        "Backfills by other roles, and superusers reading chat_backfill.status or rejected_messages, trust them as \
         the install made them. A superuser can make the change and then record it with SELECT \
         chat_backfill.record_state_definition().",
    ))
}
