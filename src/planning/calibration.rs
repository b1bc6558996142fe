//! Where a trial writes: a temporary table made like the target's columns that the engine
//! writes (their types, collations, storage and compression) and its indexes, created
//! inside the trial's rolled-back subtransaction. The sample's rows land there, never in
//! the target: the target gets no dead tuple, no index entry and no WAL from a plan or an
//! admission check, and its triggers and foreign keys do not fire. What the rows cost in
//! the target is then this table's growth (compression and indexes as the target's), and
//! the WAL that growth would write there (`estimate`'s model).
//!
//! Built from the catalog, not with `CREATE TABLE ... (LIKE target)`: LIKE needs SELECT on
//! the whole target, which the backfill does not ask of its caller, and would copy
//! defaults that draw from the target's sequences.

use pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE;
use pgrx::prelude::*;

use crate::pg::catalog::{target_columns, Relation, INHERITANCE_TREE};
use crate::pg::error::{Error, Result};
use crate::pg::subxact::in_subtransaction_catching;

pub struct Calibration {
    pub table: Relation,
    /// Each column as made here: quoted name, type, and for a column whose values are
    /// compressed (a varlena type stored EXTENDED or MAIN) the method the target compresses
    /// it with ('p' or 'l'; the server's default_toast_compression where the column names none).
    columns: Vec<Column>,
    /// The target's indexes that could be made here, by the target's index names, with the
    /// table's own name's index.
    indexes: Vec<(String, pg_sys::Oid)>,
    /// The target's indexes and generated columns that could not be made here (an expression
    /// over a column the engine does not write): not priced.
    pub unpriced: Vec<String>,
    /// Whether the target's writes go to the WAL (not an unlogged or temporary table).
    pub logged: bool,
    /// Sizes just after creation (an empty btree has its metapage).
    empty: Sizes,
}

struct Column {
    quoted: String,
    ty: String,
    collate: String,
    compression: Option<char>,
}

/// The same rows compressed with pglz and with lz4: how long writing them took, and what
/// they took as stored.
#[derive(Debug, Clone)]
pub struct Compression {
    /// The columns compressed with pglz in the target, by name as quoted.
    pub pglz_columns: Vec<String>,
    pub pglz: (std::time::Duration, i64),
    pub lz4: (std::time::Duration, i64),
}

/// Heap with TOAST, and each index, in bytes.
#[derive(Debug, Clone, Default)]
pub struct Sizes {
    pub table: i64,
    pub indexes: Vec<(String, i64)>,
}

/// The SQL type of a column the engine writes: only these are accepted by the target's
/// check (`pg::catalog`), and naming them from `pg_catalog` keeps the search_path out.
fn type_sql(type_oid: pg_sys::Oid, typmod: i32) -> Option<String> {
    Some(match type_oid {
        pg_sys::TEXTOID => "pg_catalog.text".into(),
        pg_sys::VARCHAROID if typmod >= 4 => format!("pg_catalog.varchar({})", typmod - 4),
        pg_sys::VARCHAROID => "pg_catalog.varchar".into(),
        pg_sys::JSONOID => "pg_catalog.json".into(),
        pg_sys::JSONBOID => "pg_catalog.jsonb".into(),
        pg_sys::BOOLOID => "pg_catalog.bool".into(),
        pg_sys::INT8OID => "pg_catalog.int8".into(),
        _ => return None,
    })
}

impl Calibration {
    /// Creates the table; call inside a subtransaction that is rolled back.
    pub fn create(target: &Relation, app: bool) -> Result<Calibration> {
        // Said as what it is, rather than as CREATE TABLE's error.
        let may_create = Spi::get_one::<bool>(
            "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY'::pg_catalog.text)",
        )?
        .unwrap_or(false);
        if !may_create {
            return Err(Error::new(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "cannot estimate the backfill: permission denied to create temporary tables in this database",
                "The estimate writes its sample into a temporary table, never into the target: GRANT TEMPORARY ON \
                 DATABASE to this role, or skip the estimate (force => true, or the committing \
                 CALL backfill_chat_messages_resumable(), which needs none).",
            ));
        }
        let qualified = free_name()?;
        let wanted: Vec<&str> = target_columns(app).into_iter().map(|(n, _)| n).collect();
        let mut columns = Vec::new();
        let mut storage = Vec::new();
        let default_method = match crate::pg::gucs::current_setting("default_toast_compression")?.as_deref() {
            Some("lz4") => 'l',
            _ => 'p',
        };
        Spi::connect(|client| -> Result<()> {
            let rows = client.select(
                "SELECT a.attname::pg_catalog.text, a.atttypid, a.atttypmod, \
                        CASE WHEN a.attcollation OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN NULL \
                             ELSE (SELECT pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, c.collname) \
                                     FROM pg_catalog.pg_collation c JOIN pg_catalog.pg_namespace n \
                                       ON n.oid OPERATOR(pg_catalog.=) c.collnamespace \
                                    WHERE c.oid OPERATOR(pg_catalog.=) a.attcollation \
                                      AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'::pg_catalog.text)) END, \
                        a.attstorage::pg_catalog.text, t.typstorage::pg_catalog.text, a.attcompression::pg_catalog.text \
                   FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.>) 0::pg_catalog.int2 \
                    AND NOT a.attisdropped AND a.attname::pg_catalog.text OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.text[]) \
                  ORDER BY a.attnum",
                None,
                &[target.oid.into(), wanted.clone().into()],
            )?;
            for row in rows {
                let column: String = row.get(1)?.unwrap_or_default();
                let Some(ty) = type_sql(row.get(2)?.unwrap_or(pg_sys::InvalidOid), row.get::<i32>(3)?.unwrap_or(-1)) else {
                    continue;
                };
                let quoted = pgrx::spi::quote_identifier(&column);
                let collate = row.get::<String>(4)?.map(|c| format!(" COLLATE {c}")).unwrap_or_default();
                let method = row.get::<String>(7)?;
                let (att, typ) = (row.get::<String>(5)?.unwrap_or_default(), row.get::<String>(6)?.unwrap_or_default());
                let compressed = matches!(att.as_str(), "x" | "m");
                let compression = match method.as_deref() {
                    Some("p") => Some('p'),
                    Some("l") => Some('l'),
                    _ => Some(default_method),
                }
                .filter(|_| compressed);
                columns.push(Column { quoted: quoted.clone(), ty, collate, compression });
                if att != typ {
                    let kind = match att.as_str() {
                        "p" => "PLAIN",
                        "e" => "EXTERNAL",
                        "m" => "MAIN",
                        _ => "EXTENDED",
                    };
                    storage.push(format!("ALTER COLUMN {quoted} SET STORAGE {kind}"));
                }
            }
            Ok(())
        })?;
        // Each column compressed as in the target: its own method, or the default (the same
        // here, in the same session).
        let definition = column_list(&columns, |c| match c.compression {
            Some('l') => " COMPRESSION lz4",
            Some(_) => " COMPRESSION pglz",
            None => "",
        });
        Spi::run(&format!("CREATE TEMPORARY TABLE {qualified} ({definition})"))?;
        if !storage.is_empty() {
            Spi::run(&format!("ALTER TABLE {qualified} {}", storage.join(", ")))?;
        }
        // The target's storage parameters (a fillfactor changes what the rows take), each
        // value quoted; one a temporary table cannot take is left out.
        let options = Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.string_agg(pg_catalog.format('%I = %L'::pg_catalog.text, o.option_name, o.option_value), \
                    ', '::pg_catalog.text) \
               FROM pg_catalog.pg_class c, pg_catalog.pg_options_to_table(c.reloptions) o \
              WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[target.oid.into()],
        )?;
        if let Some(options) = options {
            let _ = in_subtransaction_catching(|| Spi::run(&format!("ALTER TABLE {qualified} SET ({options})")), cannot_make);
        }
        let mut unpriced = copy_generated(target, &qualified)?;
        let oid = Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT $1::pg_catalog.text::pg_catalog.regclass::pg_catalog.oid",
            &[qualified.as_str().into()],
        )?
        .unwrap_or(pg_sys::InvalidOid);
        let (indexes, unpriced_indexes) = copy_indexes(target, &qualified, oid)?;
        unpriced.extend(unpriced_indexes);
        // Of a partitioned target, its partitions' (an unlogged parent can have logged ones).
        let logged = Spi::get_one_with_args::<bool>(
            &[INHERITANCE_TREE, " \
             SELECT pg_catalog.bool_or(c.relpersistence OPERATOR(pg_catalog.=) 'p'::pg_catalog.\"char\") \
               FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.relid \
              WHERE c.relkind OPERATOR(pg_catalog.<>) 'p'::pg_catalog.\"char\" \
                 OR c.oid OPERATOR(pg_catalog.=) $1 AND NOT EXISTS (SELECT FROM pg_catalog.pg_inherits i \
                                                               WHERE i.inhparent OPERATOR(pg_catalog.=) $1)"]
                .concat(),
            &[target.oid.into()],
        )?
        .unwrap_or(true);
        let mut calibration = Calibration {
            table: Relation { oid, name: qualified },
            columns,
            indexes,
            unpriced,
            logged,
            empty: Sizes::default(),
        };
        calibration.empty = calibration.sizes()?;
        Ok(calibration)
    }

    /// What the rows written so far take.
    pub fn growth(&self) -> Result<Sizes> {
        let now = self.sizes()?;
        let was = |name: &str| self.empty.indexes.iter().find(|(n, _)| n == name).map_or(0, |(_, b)| *b);
        Ok(Sizes {
            table: (now.table - self.empty.table).max(0),
            indexes: now.indexes.iter().map(|(n, b)| (n.clone(), (b - was(n)).max(0))).collect(),
        })
    }

    /// Where the target compresses a column with pglz and the server has lz4: the rows
    /// written here, compressed again both ways into two more tables made like this one
    /// (each value decompressed first, the same work for both), timed and measured. `None`
    /// when there is nothing to compare.
    pub fn compare_compression(&self) -> Result<Option<Compression>> {
        let candidates: Vec<&str> =
            self.columns.iter().filter(|c| c.compression == Some('p')).map(|c| c.quoted.as_str()).collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        // Only the columns whose values the sample's rows had compressed (the ids and other
        // short values never reach the threshold).
        let checks = candidates
            .iter()
            .map(|c| format!("pg_catalog.bool_or(pg_catalog.pg_column_compression({c}) IS NOT NULL)"))
            .collect::<Vec<_>>()
            .join(", ");
        let compressed =
            Spi::get_one::<Vec<Option<bool>>>(&format!("SELECT ARRAY[{checks}] FROM {}", self.table.name))?.unwrap_or_default();
        let pglz_columns: Vec<String> = candidates
            .iter()
            .zip(compressed)
            .filter(|(_, any)| any.unwrap_or(false))
            .map(|(c, _)| (*c).to_owned())
            .collect();
        let has_lz4 = Spi::get_one::<bool>(
            "SELECT 'lz4'::pg_catalog.text OPERATOR(pg_catalog.=) ANY (s.enumvals) FROM pg_catalog.pg_settings s \
              WHERE s.name OPERATOR(pg_catalog.=) 'default_toast_compression'::pg_catalog.text",
        )?
        .unwrap_or(false);
        if pglz_columns.is_empty() || !has_lz4 {
            return Ok(None);
        }
        // A compressed value is copied as it is: each is taken apart to text and made again.
        let values = self
            .columns
            .iter()
            .map(|c| match c.compression {
                Some(_) => format!(
                    "({}::pg_catalog.text OPERATOR(pg_catalog.||) ''::pg_catalog.text)::{}",
                    c.quoted, c.ty
                ),
                None => c.quoted.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut measured = Vec::new();
        for method in ["pglz", "lz4"] {
            let table = free_name()?;
            let definition = column_list(&self.columns, |c| match c.compression {
                Some('l') => " COMPRESSION lz4",
                Some(_) if method == "lz4" => " COMPRESSION lz4",
                Some(_) => " COMPRESSION pglz",
                None => "",
            });
            Spi::run(&format!("CREATE TEMPORARY TABLE {table} ({definition})"))?;
            let began = std::time::Instant::now();
            Spi::run(&format!("INSERT INTO {table} SELECT {values} FROM {}", self.table.name))?;
            let took = began.elapsed();
            let bytes = Spi::get_one_with_args::<i64>(
                "SELECT pg_catalog.pg_table_size($1::pg_catalog.text::pg_catalog.regclass)",
                &[table.as_str().into()],
            )?
            .unwrap_or(0);
            measured.push((took, bytes));
        }
        Ok(Some(Compression { pglz_columns, pglz: measured[0], lz4: measured[1] }))
    }

    fn sizes(&self) -> Result<Sizes> {
        let size = |sql: &str, oid: pg_sys::Oid| -> Result<i64> {
            Ok(Spi::get_one_with_args::<i64>(sql, &[oid.into()])?.unwrap_or(0))
        };
        let table = size("SELECT pg_catalog.pg_table_size($1::pg_catalog.regclass)", self.table.oid)?;
        let mut indexes = Vec::new();
        for (name, oid) in &self.indexes {
            indexes.push((name.clone(), size("SELECT pg_catalog.pg_relation_size($1::pg_catalog.regclass)", *oid)?));
        }
        Ok(Sizes { table, indexes })
    }
}

/// The columns' definitions, each with the compression clause `compression` gives it.
fn column_list(columns: &[Column], compression: impl Fn(&Column) -> &'static str) -> String {
    // COMPRESSION comes before COLLATE in a column's definition.
    columns.iter().map(|c| format!("{} {}{}{}", c.quoted, c.ty, compression(c), c.collate)).collect::<Vec<_>>().join(", ")
}

/// The errors a CREATE or ALTER of the trial's table can fail with because of what the target
/// has (a column or function it reads, a type, a privilege, an option the copy cannot take):
/// the object is then left out. Anything else, a cancel or a timeout above all, goes on up.
fn cannot_make(sqlstate: &str) -> bool {
    ["42", "0A", "22"].iter().any(|class| sqlstate.starts_with(class))
}

/// A name in pg_temp that no table of this session has (the caller's own temporary tables
/// included).
fn free_name() -> Result<String> {
    loop {
        let name = format!("pg_temp.{}", pgrx::spi::quote_identifier(&format!(
            "chat_backfill_trial_{}_{}",
            std::process::id(),
            next_serial()
        )));
        let taken = Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.to_regclass($1::pg_catalog.text) IS NOT NULL",
            &[name.as_str().into()],
        )?
        .unwrap_or(true);
        if !taken {
            return Ok(name);
        }
    }
}

/// The target's stored generated columns, each made on the table as the target computes it
/// (the rows' INSERT computes them, as the caller, in the target too). One that reads a
/// column the engine does not write cannot be made: it is named as not priced.
fn copy_generated(target: &Relation, table: &str) -> Result<Vec<String>> {
    // A partition may compute a generated column by an expression of its own (from 16 on),
    // which is what an INSERT runs: the parent's is not made here, and not priced.
    let partitioned = Spi::get_one_with_args::<bool>(
        "SELECT c.relkind OPERATOR(pg_catalog.=) 'p'::pg_catalog.\"char\" FROM pg_catalog.pg_class c \
          WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[target.oid.into()],
    )?
    .unwrap_or(false);
    let generated = three_texts(
            "SELECT pg_catalog.quote_ident(a.attname::pg_catalog.text), pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    pg_catalog.pg_get_expr(d.adbin, d.adrelid) \
               FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_attrdef d \
                 ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum \
              WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attgenerated OPERATOR(pg_catalog.=) 's'::pg_catalog.\"char\" \
                AND NOT a.attisdropped ORDER BY a.attnum",
        target.oid,
    )?;
    let mut unpriced = Vec::new();
    for (column, ty, expression) in generated {
        if partitioned {
            unpriced.push(format!("generated column {column} (computed by each partition)"));
            continue;
        }
        let sql = format!("ALTER TABLE {table} ADD COLUMN {column} {ty} GENERATED ALWAYS AS ({expression}) STORED");
        if !matches!(in_subtransaction_catching(|| Spi::run(&sql), cannot_make), Ok(Ok(()))) {
            unpriced.push(format!("generated column {column}"));
        }
    }
    Ok(unpriced)
}

/// The rows of a catalog query about `relation` that gives three texts.
fn three_texts(sql: &str, relation: pg_sys::Oid) -> Result<Vec<(String, String, String)>> {
    Spi::connect(|client| {
        let mut found = Vec::new();
        for row in client.select(sql, None, &[relation.into()])? {
            found.push((row.get(1)?.unwrap_or_default(), row.get(2)?.unwrap_or_default(), row.get(3)?.unwrap_or_default()));
        }
        Ok(found)
    })
}

/// Each of the target's indexes, made on the table from its definition: unique or not, its
/// method, keys, operator classes, INCLUDE columns, storage parameters and predicate. One
/// that cannot be (it reads a column the engine does not write) is left out and named.
fn copy_indexes(target: &Relation, table: &str, table_oid: pg_sys::Oid) -> Result<(Vec<(String, pg_sys::Oid)>, Vec<String>)> {
    let definitions = three_texts(
            "SELECT pg_catalog.format('%I'::pg_catalog.text, c.relname), pg_catalog.pg_get_indexdef(i.indexrelid), \
                    pg_catalog.format('%I.%I'::pg_catalog.text, n.nspname, t.relname) \
               FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid \
               JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) i.indrelid \
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) t.relnamespace \
              WHERE i.indrelid OPERATOR(pg_catalog.=) $1 \
                AND CASE WHEN t.relkind OPERATOR(pg_catalog.=) 'p'::pg_catalog.\"char\" THEN i.indisvalid \
                         ELSE i.indisready AND i.indislive END \
              ORDER BY c.relname",
        target.oid,
    )?;
    let (mut made, mut unpriced) = (Vec::new(), Vec::new());
    for (name, definition, on) in definitions {
        let Some(sql) = index_on(&definition, &name, &on, table) else {
            unpriced.push(name);
            continue;
        };
        let created = in_subtransaction_catching(
            || -> Result<Option<pg_sys::Oid>> {
                Spi::run(&sql)?;
                // The newest index of the table is the one just made.
                Ok(Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT pg_catalog.max(i.indexrelid::pg_catalog.int8)::pg_catalog.oid FROM pg_catalog.pg_index i \
                      WHERE i.indrelid OPERATOR(pg_catalog.=) $1",
                    &[table_oid.into()],
                )?)
            },
            cannot_make,
        );
        match created {
            Ok(Ok(Some(oid))) => made.push((name, oid)),
            Ok(Err(e)) => return Err(e),
            _ => unpriced.push(name),
        }
    }
    // A partitioned target's partitions may have indexes of their own, which an INSERT updates
    // for the rows routed there: not made here (their expressions would see every row), named.
    let own = three_texts(
        &[INHERITANCE_TREE, " \
         SELECT pg_catalog.format('%I'::pg_catalog.text, c.relname), ''::pg_catalog.text, ''::pg_catalog.text \
           FROM tree JOIN pg_catalog.pg_index x ON x.indrelid OPERATOR(pg_catalog.=) tree.relid \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.indexrelid \
          WHERE tree.relid OPERATOR(pg_catalog.<>) $1 AND x.indisready \
            AND NOT EXISTS (SELECT FROM pg_catalog.pg_inherits h WHERE h.inhrelid OPERATOR(pg_catalog.=) x.indexrelid) \
          ORDER BY 1"]
            .concat(),
        target.oid,
    )?;
    unpriced.extend(own.into_iter().map(|(name, _, _)| format!("{name} (an index of a partition only)")));
    Ok((made, unpriced))
}

/// `CREATE [UNIQUE] INDEX ON table USING ...` from the target index's definition as
/// `pg_get_indexdef` prints it (`CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING ...`,
/// name and table quoted as `%I` quotes them, the table always qualified): the name is
/// dropped, so PostgreSQL picks a free one. The whole head must match, so that an index
/// named to look like a definition cannot move where the rest starts.
fn index_on(definition: &str, name: &str, target: &str, table: &str) -> Option<String> {
    ["UNIQUE ", ""].iter().find_map(|unique| {
        ["ONLY ", ""].iter().find_map(|only| {
            let head = format!("CREATE {unique}INDEX {name} ON {only}{target} USING ");
            definition.strip_prefix(head.as_str()).map(|rest| format!("CREATE {unique}INDEX ON {table} USING {rest}"))
        })
    })
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::index_on;

    #[test]
    fn an_index_definition_moves_to_the_table() {
        let target = "public.chat_message";
        assert_eq!(
            index_on("CREATE UNIQUE INDEX chat_message_pkey ON public.chat_message USING btree (id)", "chat_message_pkey", target, "pg_temp.t"),
            Some("CREATE UNIQUE INDEX ON pg_temp.t USING btree (id)".into())
        );
        assert_eq!(
            index_on(
                "CREATE INDEX \"a b\" ON ONLY \"s.x\".m USING btree (chat_id, created_at) WHERE done",
                "\"a b\"",
                "\"s.x\".m",
                "pg_temp.t"
            ),
            Some("CREATE INDEX ON pg_temp.t USING btree (chat_id, created_at) WHERE done".into())
        );
        assert_eq!(index_on("CREATE INDEX i ON public.other USING btree (id)", "i", target, "pg_temp.t"), None);
        // A name that spells a definition does not move the head.
        let sly = "\"x ON public.chat_message USING btree (id); DROP TABLE chat; --\"";
        let definition = format!("CREATE INDEX {sly} ON public.chat_message USING btree (role)");
        assert_eq!(
            index_on(&definition, sly, target, "pg_temp.t"),
            Some("CREATE INDEX ON pg_temp.t USING btree (role)".into())
        );
        assert_eq!(index_on(&definition, "x", target, "pg_temp.t"), None);
    }
}
