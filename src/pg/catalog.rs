//! Finding and checking the source and target tables before a run, so that misuse fails
//! at once with a SQLSTATE, the object's name and a hint, not halfway with a raw error.

use pgrx::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::pg::error::{Error, Result};

/// The `chat_message` columns, in order, with the types the rows need.
pub const TARGET_COLUMNS: [(&str, ColumnKind); 17] = [
    ("id", ColumnKind::Text),
    ("chat_id", ColumnKind::Text),
    ("user_id", ColumnKind::Text),
    ("role", ColumnKind::Text),
    ("parent_id", ColumnKind::Text),
    ("content", ColumnKind::Json),
    ("output", ColumnKind::Json),
    ("model_id", ColumnKind::Text),
    ("files", ColumnKind::Json),
    ("sources", ColumnKind::Json),
    ("embeds", ColumnKind::Json),
    ("done", ColumnKind::Bool),
    ("status_history", ColumnKind::Json),
    ("error", ColumnKind::Json),
    ("usage", ColumnKind::Json),
    ("created_at", ColumnKind::Int8),
    ("updated_at", ColumnKind::Int8),
];

/// The columns Open WebUI 0.12.4's head schema adds, which `rows => 'app'` fills too.
pub const APP_COLUMNS: [(&str, ColumnKind); 2] = [("meta", ColumnKind::Json), ("context_summary", ColumnKind::Text)];

/// The columns a run writes, in the order of its rows' fields.
pub fn target_columns(app: bool) -> Vec<(&'static str, ColumnKind)> {
    let mut columns = TARGET_COLUMNS.to_vec();
    if app {
        columns.extend(APP_COLUMNS);
    }
    columns
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ColumnKind {
    Text,
    Json,
    Bool,
    Int8,
}

impl ColumnKind {
    fn accepts(self, type_oid: pg_sys::Oid) -> bool {
        match self {
            ColumnKind::Text => type_oid == pg_sys::TEXTOID || type_oid == pg_sys::VARCHAROID,
            ColumnKind::Json => type_oid == pg_sys::JSONOID || type_oid == pg_sys::JSONBOID,
            ColumnKind::Bool => type_oid == pg_sys::BOOLOID,
            ColumnKind::Int8 => type_oid == pg_sys::INT8OID,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            ColumnKind::Text => "text",
            ColumnKind::Json => "json (or jsonb)",
            ColumnKind::Bool => "boolean",
            ColumnKind::Int8 => "bigint",
        }
    }
}

/// Open WebUI's DDL for the target, quoted in hints.
pub const TARGET_DDL_HINT: &str = "Create it first, as Open WebUI's migration 8452d01d26d7 does: \
CREATE TABLE chat_message (id text PRIMARY KEY, chat_id text NOT NULL REFERENCES chat(id) ON DELETE CASCADE, \
user_id text, role text NOT NULL, parent_id text, content json, output json, model_id text, files json, \
sources json, embeds json, done boolean DEFAULT true, status_history json, error json, usage json, \
created_at bigint, updated_at bigint); see the README for its indexes.";

/// A table resolved to its oid and its quoted, always schema-qualified name (so the SQL
/// we build names the same table whatever the search_path).
#[derive(Clone)]
pub struct Relation {
    pub oid: pg_sys::Oid,
    pub name: String,
}

/// `given` when the caller named a table (PostgreSQL already resolved it), else the
/// Open WebUI default looked up on the search_path, with a hint when it is missing.
pub fn resolve(given: Option<pg_sys::Oid>, default_name: &str, role: &str) -> Result<Relation> {
    let oid = match given {
        Some(oid) => Some(oid),
        None => optional(crate::pg::read_only::get_one::<pg_sys::Oid>(
            "SELECT pg_catalog.to_regclass($1::pg_catalog.text)::pg_catalog.oid",
            &[default_name.into()],
        ))?,
    };
    let Some(oid) = oid else {
        let hint = if role == "target" {
            TARGET_DDL_HINT.to_owned()
        } else {
            format!("Name the {role} table explicitly, e.g. {role} => 'myschema.{default_name}', or check search_path.")
        };
        return Err(Error::new(ERRCODE_UNDEFINED_TABLE, format!("{role} table \"{default_name}\" does not exist"), hint));
    };
    match qualified_name("pg_class", "relname", "relnamespace", oid) {
        Some(name) => Ok(Relation { oid, name }),
        None => Err(Error::new(ERRCODE_UNDEFINED_TABLE, format!("{role} table with oid {oid:?} does not exist"), "Pass an existing table.")),
    }
}

/// A lookup that may find nothing: no row is `None`, not an error.
fn optional<T>(found: std::result::Result<Option<T>, pgrx::spi::Error>) -> Result<Option<T>> {
    match found {
        Ok(value) => Ok(value),
        Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `schema.name` of the object `oid` in `catalog` (pg_class or pg_type), quoted by
/// PostgreSQL's own `%I` (as `chat_backfill.table_name`, which the run state's policies compare with).
fn qualified_name(catalog: &str, name: &str, namespace: &str, oid: pg_sys::Oid) -> Option<String> {
    crate::pg::read_only::get_one::<String>(
        &format!(
            "SELECT pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, o.{name}) FROM pg_catalog.{catalog} o \
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.{namespace} \
             WHERE o.oid OPERATOR(pg_catalog.=) $1"
        ),
        &[oid.into()],
    )
    .ok()
    .flatten()
}


/// The type of each named column, or `None` where the table has no such column.
pub fn column_types(relation: &Relation, columns: &[&str]) -> Result<Vec<Option<pg_sys::Oid>>> {
    columns
        .iter()
        .map(|column| {
            optional(crate::pg::read_only::get_one::<pg_sys::Oid>(
                "SELECT a.atttypid FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) $1 \
                 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2 \
                 AND NOT a.attisdropped",
                &[relation.oid.into(), (*column).into()],
            ))
        })
        .collect()
}

/// The target must have every `chat_message` column with a usable type, and a unique,
/// non-partial index on `id` alone, which `ON CONFLICT (id)` needs.
pub fn check_target(target: &Relation, app: bool) -> Result<()> {
    let columns = target_columns(app);
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    for ((name, kind), type_oid) in columns.iter().zip(column_types(target, &names)?) {
        match type_oid {
            None if APP_COLUMNS.iter().any(|(n, _)| n == name) => {
                return Err(Error::new(
                    ERRCODE_UNDEFINED_COLUMN,
                    format!("target table {} has no column \"{name}\", which rows => 'app' writes", target.name),
                    "rows => 'app' writes Open WebUI 0.12.4's head schema, where chat_message has meta json \
                     (revision 856c5b02fb54) and context_summary text (4c5ce3d2f27f): run Open WebUI's migrations to \
                     their head first, or use rows => 'migration' for the schema migration 8452d01d26d7 creates.",
                ))
            }
            None => {
                return Err(Error::new(
                    ERRCODE_UNDEFINED_COLUMN,
                    format!("target table {} has no column \"{name}\"", target.name),
                    "The target needs all of Open WebUI's chat_message columns: id, chat_id, user_id, role, parent_id, \
                     content, output, model_id, files, sources, embeds, done, status_history, error, usage, created_at, updated_at.",
                ))
            }
            Some(oid) if !kind.accepts(oid) => {
                return Err(Error::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!("column \"{name}\" of target table {} has the wrong type", target.name),
                    format!("Make \"{name}\" {}, as in Open WebUI's chat_message.", kind.expected()),
                )
                .with_detail(format!("It is {}.", type_name(oid)?)))
            }
            Some(_) => {}
        }
    }
    if !has_unique_index(target, "id")? {
        return Err(Error::new(
            ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("target table {} has no unique index on \"id\"", target.name),
            format!(
                "The backfill writes with ON CONFLICT (id) DO NOTHING so that a re-run only adds what is missing: \
                 ALTER TABLE {} ADD PRIMARY KEY (id);",
                target.name
            ),
        ));
    }
    Ok(())
}

/// SQL: the pg_index row `i` is a valid, unique, non-partial index on the column named by
/// the text parameter `$2` alone (what `ON CONFLICT ($2)` and keyset reading rely on).
/// The table `$1` and every table under it (partitions and inheritance children, at any
/// depth), as the CTE `tree(relid)` that a query goes on from. pg_inherits has no cycles,
/// and UNION visits a table under two parents once.
pub const INHERITANCE_TREE: &str = "WITH RECURSIVE tree(relid) AS ( \
    SELECT $1::pg_catalog.oid \
    UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.relid)";

pub const UNIQUE_ON_COLUMN: &str = "(i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL \
    AND i.indnkeyatts OPERATOR(pg_catalog.=) 1::pg_catalog.int2 \
    AND (SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid \
         AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]) OPERATOR(pg_catalog.=) $2::pg_catalog.name)";

/// Whether `column` alone has a valid, unique, non-partial index.
fn has_unique_index(relation: &Relation, column: &str) -> Result<bool> {
    Ok(crate::pg::read_only::get_one::<bool>(
        &format!(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND {UNIQUE_ON_COLUMN})"
        ),
        &[relation.oid.into(), column.into()],
    )?
    .unwrap_or(false))
}

/// The committing form reads the source in key order after the last key: duplicate keys
/// at a batch boundary would be skipped, so the key must be unique.
pub fn check_source_key(source: &Relation, id_column: &str) -> Result<()> {
    if has_unique_index(source, id_column)? {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_INVALID_COLUMN_REFERENCE,
        format!("source table {} has no unique index on \"{id_column}\"", source.name),
        format!(
            "The committing form reads chats in key order and resumes after the last key, which must be unique \
             (Open WebUI's chat.id is its primary key): ALTER TABLE {} ADD PRIMARY KEY ({});",
            source.name,
            pgrx::spi::quote_identifier(id_column)
        ),
    ))
}

/// How keys of one type are ordered and compared: the operators of the type's default
/// btree operator class, each named with its own schema (`OPERATOR(pg_catalog.>)` for the
/// built-in types), so that `key > last_key` and `ORDER BY key` agree for every type and a
/// search_path cannot swap either.
#[derive(Clone, Debug)]
pub struct KeyOps {
    pub gt: String,
    pub eq: String,
}

/// The key operators of `type_oid`, or `None` when it has no default btree operator class
/// (json, point, xml, ...): such a key cannot be read in order.
pub fn key_operators(type_oid: pg_sys::Oid) -> Result<Option<KeyOps>> {
    // SAFETY: the type cache entry lives for the backend; only two oids are read from it.
    let (gt, eq) = unsafe {
        let entry = pg_sys::lookup_type_cache(type_oid, (pg_sys::TYPECACHE_GT_OPR | pg_sys::TYPECACHE_EQ_OPR) as i32);
        ((*entry).gt_opr, (*entry).eq_opr)
    };
    if gt == pg_sys::InvalidOid || eq == pg_sys::InvalidOid {
        return Ok(None);
    }
    let name = |oid: pg_sys::Oid| -> Result<String> {
        crate::pg::read_only::get_one::<String>(
            "SELECT pg_catalog.format('OPERATOR(%I.%s)'::pg_catalog.text, n.nspname, o.oprname) \
             FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.oprnamespace \
             WHERE o.oid OPERATOR(pg_catalog.=) $1",
            &[oid.into()],
        )?
        .ok_or_else(|| Error::from(pgrx::spi::Error::InvalidPosition))
    };
    Ok(Some(KeyOps { gt: name(gt)?, eq: name(eq)? }))
}

/// The committing form orders chats by key: refuses a key type without a btree order.
pub fn check_key_order(source: &Relation, id_column: &str, ops: Option<&KeyOps>, type_name: &str) -> Result<()> {
    if ops.is_some() {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_DATATYPE_MISMATCH,
        format!("column \"{id_column}\" of source table {} has type {type_name}, which has no btree order", source.name),
        "The committing form reads chats in key order and resumes after the last key: use a key column of a type \
         with a default btree operator class (text, integers, numeric, timestamps, uuid, ...), or the one-transaction \
         form SELECT * FROM backfill_chat_messages(), which needs no order.",
    ))
}

/// The source must have the three columns the backfill reads, the document in json,
/// jsonb or text. Returns the id column's type and the document's.
pub fn check_source(source: &Relation, id: &str, user_id: &str, chat: &str) -> Result<(pg_sys::Oid, pg_sys::Oid)> {
    let types = column_types(source, &[id, user_id, chat])?;
    for ((column, type_oid), role) in [id, user_id, chat].iter().zip(&types).zip(["id_column", "user_id_column", "chat_column"]) {
        match *type_oid {
            None => {
                return Err(Error::new(
                    ERRCODE_UNDEFINED_COLUMN,
                    format!("source table {} has no column \"{column}\"", source.name),
                    format!("Name the right column with {role} => '...'."),
                ))
            }
            Some(oid)
                if role == "chat_column"
                    && ![pg_sys::JSONOID, pg_sys::JSONBOID, pg_sys::TEXTOID, pg_sys::VARCHAROID].contains(&oid) =>
            {
                return Err(Error::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!("column \"{column}\" of source table {} is not json, jsonb or text", source.name),
                    "The chat document must be stored as json, jsonb or text.",
                )
                .with_detail(format!("It is {}.", type_name(oid)?)))
            }
            Some(_) => {}
        }
    }
    Ok((types[0].unwrap_or(pg_sys::TEXTOID), types[2].unwrap_or(pg_sys::TEXTOID)))
}

/// A type's name as SQL can spell it whatever the search_path: `pg_catalog."varchar"`.
pub fn qualified_type_name(oid: pg_sys::Oid) -> Result<String> {
    Ok(qualified_name("pg_type", "typname", "typnamespace", oid).unwrap_or_else(|| "pg_catalog.text".to_owned()))
}

/// The type's name for messages: `character varying`.
fn type_name(oid: pg_sys::Oid) -> Result<String> {
    Ok(optional(crate::pg::read_only::get_one::<String>("SELECT pg_catalog.format_type($1, NULL::pg_catalog.int4)", &[oid.into()]))?
        .unwrap_or_else(|| format!("type {oid:?}")))
}

/// Whether the table has rules (which COPY would bypass and ON CONFLICT refuses).
pub fn has_rules(relation: pg_sys::Oid) -> bool {
    // SAFETY: opens and closes the relcache entry of an existing relation to read a flag.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relation);
        if rel.is_null() {
            return false;
        }
        let rules = (*(*rel).rd_rel).relhasrules;
        pg_sys::RelationClose(rel);
        rules
    }
}

/// The caller must be able to read the source and write the target, checked before
/// anything is read or any run state changes (PostgreSQL would refuse later anyway, after
/// work was done). The target's id is read too: `ON CONFLICT (id)` needs SELECT on it, and
/// a run takes that path whenever COPY cannot take a batch (a re-run, a bad row), so a role
/// without it would fail in the middle of a run. A target with rules is read whole: without
/// ON CONFLICT, the backfill asks it which ids are missing.
pub fn check_privileges(source: &Relation, target: Option<&Relation>) -> Result<()> {
    let reads_target = target.filter(|t| has_rules(t.oid));
    let wanted = [
        (Some(source), pg_sys::ACL_SELECT, "SELECT", None),
        (target, pg_sys::ACL_INSERT, "INSERT", None),
        (target, pg_sys::ACL_SELECT, "SELECT", Some("id")),
        (reads_target, pg_sys::ACL_SELECT, "SELECT", None),
    ];
    for (relation, mode, privilege, column) in wanted {
        let Some(relation) = relation else { continue };
        let granted = match column {
            // SAFETY: pure catalog lookups on an existing relation oid for the current user.
            None => unsafe {
                pg_sys::pg_class_aclcheck(relation.oid, pg_sys::GetUserId(), mode as pg_sys::AclMode)
                    == pg_sys::AclResult::ACLCHECK_OK
            },
            Some(column) => crate::pg::read_only::get_one::<bool>(
                "SELECT pg_catalog.has_column_privilege($1::pg_catalog.oid, $2::pg_catalog.text, 'SELECT'::pg_catalog.text)",
                &[relation.oid.into(), column.into()],
            )?
            .unwrap_or(false),
        };
        if !granted {
            let (what, grant) = match column {
                None => (format!("{privilege} on table {}", relation.name), format!("GRANT {privilege} ON {}", relation.name)),
                Some(c) => (
                    format!("{privilege} on column {c} of table {} (ON CONFLICT ({c}) reads it)", relation.name),
                    format!("GRANT {privilege} ({c}) ON {}", relation.name),
                ),
            };
            return Err(Error::new(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied: the backfill needs {what}"),
                format!("Run it as the tables' owner, or {grant} TO the role that runs it."),
            ));
        }
    }
    Ok(())
}

/// `verify()` reads the target too: SELECT on it, checked before anything is read.
pub fn check_readable(relation: &Relation, purpose: &str) -> Result<()> {
    // SAFETY: a pure catalog lookup on an existing relation oid for the current user.
    let granted = unsafe {
        pg_sys::pg_class_aclcheck(relation.oid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
    };
    if granted {
        return Ok(());
    }
    Err(Error::new(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied: {purpose} needs SELECT on table {}", relation.name),
        format!("Run it as the tables' owner, or GRANT SELECT ON {} TO the role that runs it.", relation.name),
    ))
}
