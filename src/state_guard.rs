//! The state tables (`chat_backfill.runs`, `rejected_messages`, `run_ranges`, `launches`)
//! belong to the extension's owner, so that its pg_dump and pg_restore carry them; every
//! role that backfills writes them with its own rights. Whatever their owner attaches to
//! them (a trigger, a rule, a default, a constraint, an index expression or a policy
//! calling a function of its own) would run with the rights of that role: a superuser's
//! backfill of its own tables would run the owner's code as superuser. So before each
//! transaction of a backfill writes or reads the state, and unless the owner could act as
//! the caller anyway, the caller takes the tables' ROW EXCLUSIVE lock (no trigger, rule,
//! policy or default can be added until the transaction ends) and checks that nothing on
//! them runs code but PostgreSQL's and the extension's.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE;

use crate::error::{Error, Result};

/// The state tables whose owner cannot act as the calling role.
const FOREIGN_OWNED: &str = "\
    SELECT c.oid FROM pg_catalog.pg_class c \
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid \
       AND c.relkind OPERATOR(pg_catalog.=) 'r'::pg_catalog.\"char\" \
       AND NOT pg_catalog.pg_has_role(c.relowner, CURRENT_USER, 'USAGE'::pg_catalog.text) \
     ORDER BY c.oid";

/// The first object on those tables that runs code other than PostgreSQL's and the
/// extension's: any trigger or rule (we make none), and anything attached to them (the
/// table's own columns, defaults, constraints, indexes, policies) that uses a function, an
/// operator or a type from outside pg_catalog and the extension, or a table outside
/// pg_catalog and the extension's schema (a policy's subquery runs that table's policies).
/// Nobody but a superuser can create objects in that schema (not even an index: CREATE
/// INDEX needs CREATE on the schema), so what is there is ours or a superuser's.
const FOREIGN_CODE: &str = "\
    WITH state AS (SELECT pg_catalog.unnest($1::pg_catalog.oid[]) AS oid), \
    ext AS (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'chat_backfill'::pg_catalog.name), \
    attached (classid, objid) AS ( \
        SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, s.oid FROM state s \
        UNION ALL SELECT 'pg_catalog.pg_attrdef'::pg_catalog.regclass::pg_catalog.oid, d.oid \
                    FROM pg_catalog.pg_attrdef d JOIN state s ON d.adrelid OPERATOR(pg_catalog.=) s.oid \
        UNION ALL SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, k.oid \
                    FROM pg_catalog.pg_constraint k JOIN state s ON k.conrelid OPERATOR(pg_catalog.=) s.oid \
        UNION ALL SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, i.indexrelid \
                    FROM pg_catalog.pg_index i JOIN state s ON i.indrelid OPERATOR(pg_catalog.=) s.oid \
        UNION ALL SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass::pg_catalog.oid, p.oid \
                    FROM pg_catalog.pg_policy p JOIN state s ON p.polrelid OPERATOR(pg_catalog.=) s.oid) \
    SELECT (SELECT found FROM ( \
        SELECT pg_catalog.pg_describe_object('pg_catalog.pg_trigger'::pg_catalog.regclass::pg_catalog.oid, t.oid, 0) \
          FROM pg_catalog.pg_trigger t JOIN state s ON t.tgrelid OPERATOR(pg_catalog.=) s.oid WHERE NOT t.tgisinternal \
        UNION ALL \
        SELECT pg_catalog.pg_describe_object('pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid, r.oid, 0) \
          FROM pg_catalog.pg_rewrite r JOIN state s ON r.ev_class OPERATOR(pg_catalog.=) s.oid \
        UNION ALL \
        SELECT pg_catalog.concat(pg_catalog.pg_describe_object(a.classid, a.objid, 0), ' uses '::pg_catalog.text, \
                                 pg_catalog.pg_describe_object(d.refclassid, d.refobjid, 0)) \
          FROM attached a JOIN pg_catalog.pg_depend d \
            ON d.classid OPERATOR(pg_catalog.=) a.classid AND d.objid OPERATOR(pg_catalog.=) a.objid, \
          LATERAL (SELECT EXISTS (SELECT FROM pg_catalog.pg_depend m, ext \
                                   WHERE m.classid OPERATOR(pg_catalog.=) d.refclassid \
                                     AND m.objid OPERATOR(pg_catalog.=) d.refobjid \
                                     AND m.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass::pg_catalog.oid \
                                     AND m.refobjid OPERATOR(pg_catalog.=) ext.oid \
                                     AND m.deptype OPERATOR(pg_catalog.=) 'e'::pg_catalog.\"char\")) AS x (member) \
         WHERE CASE d.refclassid \
                 WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid \
                   THEN (SELECT f.pronamespace FROM pg_catalog.pg_proc f WHERE f.oid OPERATOR(pg_catalog.=) d.refobjid) \
                        OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid AND NOT member \
                 WHEN 'pg_catalog.pg_operator'::pg_catalog.regclass::pg_catalog.oid \
                   THEN (SELECT o.oprnamespace FROM pg_catalog.pg_operator o WHERE o.oid OPERATOR(pg_catalog.=) d.refobjid) \
                        OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid AND NOT member \
                 WHEN 'pg_catalog.pg_type'::pg_catalog.regclass::pg_catalog.oid \
                   THEN (SELECT y.typnamespace FROM pg_catalog.pg_type y WHERE y.oid OPERATOR(pg_catalog.=) d.refobjid) \
                        OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid AND NOT member \
                 WHEN 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid \
                   THEN (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) d.refobjid) \
                        OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid, \
                                                          'chat_backfill'::pg_catalog.regnamespace::pg_catalog.oid]) \
                 ELSE false END \
    ) AS f (found) LIMIT 1)";

/// Refuses (42501) when the state tables carry code of their owner's that would run with the
/// caller's rights; locks them against new such code until the transaction ends.
pub fn check() -> Result<()> {
    let tables = Spi::connect(|client| {
        let mut tables = Vec::new();
        for row in client.select(FOREIGN_OWNED, None, &[])? {
            tables.extend(row.get::<pg_sys::Oid>(1)?);
        }
        Ok::<_, pgrx::spi::Error>(tables)
    })?;
    if tables.is_empty() {
        return Ok(());
    }
    for &table in &tables {
        // SAFETY: an ordinary, interruptible lock on an existing table, released at the end
        // of the transaction; ROW EXCLUSIVE is what the backfill's own writes take anyway.
        unsafe { pg_sys::LockRelationOid(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
    }
    let found = crate::read_only::get_one::<String>(FOREIGN_CODE, &[tables.into()])?;
    let Some(found) = found else { return Ok(()) };
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("chat_backfill: the extension's state tables run code that is not PostgreSQL's or chat_backfill's: {found}"),
        "It would run with your rights when the backfill writes its state. The state tables' owner (the extension's \
         owner) added it: drop it, or run the backfill as that role.",
    ))
}
