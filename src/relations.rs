//! Finding and checking the source and target tables before a run, so that misuse fails
//! at once with a SQLSTATE, the object's name and a hint, not halfway with a raw error.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;

use crate::error::UsageError;

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

/// A table resolved to its oid and its quoted, schema-qualified-if-needed name.
pub struct Relation {
    pub oid: pg_sys::Oid,
    pub name: String,
}

/// `given` when the caller named a table (PostgreSQL already resolved it), else the
/// Open WebUI default looked up on the search_path, with a hint when it is missing.
pub fn resolve(given: Option<pg_sys::Oid>, default_name: &str, role: &str) -> Relation {
    let oid = match given {
        Some(oid) => oid,
        None => Spi::get_one_with_args::<pg_sys::Oid>("SELECT to_regclass($1)::oid", &[default_name.into()])
            .unwrap_or(None)
            .unwrap_or_else(|| {
                let hint = if role == "target" {
                    TARGET_DDL_HINT.to_owned()
                } else {
                    format!("Name the {role} table explicitly, e.g. {role} => 'myschema.{default_name}', or check search_path.")
                };
                UsageError::new(ERRCODE_UNDEFINED_TABLE, format!("{role} table \"{default_name}\" does not exist"), hint)
                    .raise()
            }),
    };
    let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[oid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            UsageError::new(ERRCODE_UNDEFINED_TABLE, format!("{role} table with oid {oid:?} does not exist"), "Pass an existing table.")
                .raise()
        });
    Relation { oid, name }
}

/// The type of each named column, or `None` where the table has no such column.
fn column_types(relation: &Relation, columns: &[&str]) -> Vec<Option<pg_sys::Oid>> {
    columns
        .iter()
        .map(|column| {
            Spi::get_one_with_args::<pg_sys::Oid>(
                "SELECT atttypid FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
                &[relation.oid.into(), (*column).into()],
            )
            .unwrap_or(None)
        })
        .collect()
}

/// The target must have every `chat_message` column with a usable type, and a unique,
/// non-partial index on `id` alone, which `ON CONFLICT (id)` needs.
pub fn check_target(target: &Relation) {
    let names: Vec<&str> = TARGET_COLUMNS.iter().map(|(n, _)| *n).collect();
    for ((name, kind), type_oid) in TARGET_COLUMNS.iter().zip(column_types(target, &names)) {
        match type_oid {
            None => UsageError::new(
                ERRCODE_UNDEFINED_COLUMN,
                format!("target table {} has no column \"{name}\"", target.name),
                "The target needs all of Open WebUI's chat_message columns: id, chat_id, user_id, role, parent_id, \
                 content, output, model_id, files, sources, embeds, done, status_history, error, usage, created_at, updated_at.",
            )
            .raise(),
            Some(oid) if !kind.accepts(oid) => UsageError::new(
                ERRCODE_DATATYPE_MISMATCH,
                format!("column \"{name}\" of target table {} has the wrong type", target.name),
                format!("Make \"{name}\" {}, as in Open WebUI's chat_message.", kind.expected()),
            )
            .with_detail(format!("It is {}.", type_name(oid)))
            .raise(),
            Some(_) => {}
        }
    }
    let has_unique_id = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL \
         AND i.indnkeyatts = 1 AND a.attname = 'id')",
        &[target.oid.into()],
    )
    .unwrap_or(Some(false))
    .unwrap_or(false);
    if !has_unique_id {
        UsageError::new(
            ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("target table {} has no unique index on \"id\"", target.name),
            format!(
                "The backfill writes with ON CONFLICT (id) DO NOTHING so that a re-run only adds what is missing: \
                 ALTER TABLE {} ADD PRIMARY KEY (id);",
                target.name
            ),
        )
        .raise();
    }
}

/// The source must have the three columns the backfill reads, the document in json,
/// jsonb or text.
pub fn check_source(source: &Relation, id: &str, user_id: &str, chat: &str) {
    for ((column, type_oid), role) in [id, user_id, chat]
        .iter()
        .zip(column_types(source, &[id, user_id, chat]))
        .zip(["id_column", "user_id_column", "chat_column"])
    {
        match type_oid {
            None => UsageError::new(
                ERRCODE_UNDEFINED_COLUMN,
                format!("source table {} has no column \"{column}\"", source.name),
                format!("Name the right column with {role} => '...'."),
            )
            .raise(),
            Some(oid)
                if role == "chat_column"
                    && ![pg_sys::JSONOID, pg_sys::JSONBOID, pg_sys::TEXTOID, pg_sys::VARCHAROID].contains(&oid) =>
            {
                UsageError::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!("column \"{column}\" of source table {} is not json, jsonb or text", source.name),
                    "The chat document must be stored as json, jsonb or text.",
                )
                .with_detail(format!("It is {}.", type_name(oid)))
                .raise()
            }
            Some(_) => {}
        }
    }
}

/// The SQL spelling of a column's type (checked to exist by `check_source`).
pub fn column_type_name(relation: &Relation, column: &str) -> String {
    type_name(column_types(relation, &[column])[0].expect("checked column"))
}

fn type_name(oid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT format_type($1, NULL)", &[oid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("type {oid:?}"))
}
