//! Turning the SQL arguments of a backfill into checked `Settings`: bounds, table
//! resolution, shape and privilege checks, and the source filter's shape all happen
//! before the first chat is read or any run state is written.

use std::ffi::CString;

use pgrx::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::engine::tuning::Tuner;
use crate::pg::catalog::{check_privileges, check_source, check_target, key_operators, qualified_type_name, resolve, KeyOps, Relation};
use crate::pg::error::{Error, Result};
use crate::pg::gucs::MAX_BATCH_SIZE;

#[derive(Clone)]
pub struct Settings {
    pub source: Relation,
    pub target: Relation,
    pub batch_size: usize,
    pub now: i64,
    /// A SQL boolean expression over the source's columns (caller's own privileges).
    pub source_filter: Option<String>,
    pub id_column: String,
    pub user_id_column: String,
    pub chat_column: String,
    pub dry_run: bool,
    /// Set by the form that runs: a value of `chat_backfill.runs_run_id_seq`.
    pub run_id: i64,
    /// The id column's type, schema-qualified, for keyset reading.
    pub id_type: String,
    /// How that type orders and compares (`None`: it has no btree order; only the
    /// one-transaction form, which reads in no order, can use such a key).
    pub key_ops: Option<KeyOps>,
    /// Whether the document is jsonb, which is read through its text form (json and text
    /// columns are read as they are stored).
    pub chat_is_jsonb: bool,
    /// Read only this share of the source's pages (`TABLESAMPLE SYSTEM`, repeatable): an
    /// estimate's trial run. `None`: every row.
    pub sample_percent: Option<f64>,
    /// A trial run (rolled back by its caller): no NOTICEs and no recorded rejections.
    pub trial: bool,
    /// `batch_time`: `batch_size` is then only the first batch's size.
    pub tuner: Option<Tuner>,
    /// Which rows to write.
    pub rows: RowsMode,
}

/// The SQL arguments, as given.
pub struct Request<'a> {
    pub source: Option<pg_sys::Oid>,
    pub target: Option<pg_sys::Oid>,
    pub batch_size: Option<i32>,
    pub now: Option<i64>,
    pub source_filter: Option<&'a str>,
    pub id_column: &'a str,
    pub user_id_column: &'a str,
    pub chat_column: &'a str,
    pub dry_run: bool,
    /// Microseconds, as given (negative included, to be refused as it was written).
    pub batch_time: Option<i128>,
    /// `'migration'` or `'app'` (see `RowsMode`).
    pub rows: &'a str,
}

impl<'a> Request<'a> {
    /// A request for `source` and `target` (NULL: `chat`, `chat_message`) with every other
    /// argument at its default: Open WebUI's column names, the migration's rows, no filter,
    /// no batch size or `now` of its own (the settings and the clock decide). The one place
    /// those defaults are written; callers set what they were given over it.
    pub fn new(source: Option<pg_sys::Oid>, target: Option<pg_sys::Oid>) -> Request<'a> {
        Request {
            source,
            target,
            batch_size: None,
            now: None,
            source_filter: None,
            id_column: "id",
            user_id_column: "user_id",
            chat_column: "chat",
            dry_run: false,
            batch_time: None,
            rows: "migration",
        }
    }

    /// The column arguments as given; NULL keeps Open WebUI's name.
    pub fn columns(mut self, id: Option<&'a str>, user_id: Option<&'a str>, chat: Option<&'a str>) -> Request<'a> {
        self.id_column = id.unwrap_or(self.id_column);
        self.user_id_column = user_id.unwrap_or(self.user_id_column);
        self.chat_column = chat.unwrap_or(self.chat_column);
        self
    }

    /// The `rows` argument as given; NULL keeps the migration's.
    pub fn rows(mut self, rows: Option<&'a str>) -> Request<'a> {
        self.rows = rows.unwrap_or(self.rows);
        self
    }
}

/// Which rows to write: exactly what Open WebUI's migration 8452d01d26d7 writes, or what
/// Open WebUI 0.12.4 itself writes when it opens a chat without rows (`app_rows`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RowsMode {
    Migration,
    App,
}

impl RowsMode {
    pub fn parse(rows: &str) -> Result<RowsMode> {
        match rows {
            "migration" => Ok(RowsMode::Migration),
            "app" => Ok(RowsMode::App),
            other => Err(Error::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("rows must be 'migration' or 'app', not {other:?}"),
                "'migration' writes exactly what Open WebUI's migration writes; 'app' writes what Open WebUI 0.12.4 \
                 writes when it opens a chat (needs its chat_message.meta and context_summary columns).",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RowsMode::Migration => "migration",
            RowsMode::App => "app",
        }
    }

    pub fn is_app(self) -> bool {
        self == RowsMode::App
    }
}

impl Request<'_> {
    pub fn check(self) -> Result<Settings> {
        // NULL takes chat_backfill.batch_size, which PostgreSQL keeps within these bounds.
        let batch_size = self.batch_size.unwrap_or_else(crate::pg::gucs::batch_size);
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(Error::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("batch_size {batch_size} is out of range"),
                format!("Use a batch_size between 1 and {MAX_BATCH_SIZE}; 5000 is a good default."),
            ));
        }
        let tuner = match self.batch_time {
            None => None,
            Some(us) if us > 0 && us <= 3_600_000_000 => Some(Tuner::new(std::time::Duration::from_micros(us as u64))),
            Some(us) => {
                return Err(Error::new(
                    ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("batch_time must be more than 0 and at most 1 hour, not {} s", us as f64 / 1e6),
                    "Pass the time one batch should take, like '2 seconds'; NULL keeps batch_size fixed.",
                ))
            }
        };
        let batch_size = tuner.map_or(batch_size as usize, |t| t.start(batch_size as usize));
        // SAFETY: reads a backend global that is fixed for the session.
        if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
            return Err(Error::new(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "chat_backfill needs a UTF8 database",
                "Open WebUI's databases are UTF8; run the backfill in one.",
            ));
        }
        let source = resolve(self.source, "chat", "source")?;
        let target = resolve(self.target, "chat_message", "target")?;
        let (id_type, chat_type) = check_source(&source, self.id_column, self.user_id_column, self.chat_column)?;
        let rows = RowsMode::parse(self.rows)?;
        check_target(&target, rows.is_app())?;
        check_privileges(&source, (!self.dry_run).then_some(&target))?;
        if !self.dry_run {
            crate::engine::state_guard::check()?;
        }
        let source_filter = self.source_filter.filter(|f| !f.trim().is_empty()).map(str::to_owned);
        if let Some(filter) = &source_filter {
            check_filter(&source, filter)?;
        }
        Ok(Settings {
            source,
            target,
            batch_size,
            now: self.now.unwrap_or_else(transaction_start_epoch),
            source_filter,
            id_column: self.id_column.to_owned(),
            user_id_column: self.user_id_column.to_owned(),
            chat_column: self.chat_column.to_owned(),
            dry_run: self.dry_run,
            run_id: 0,
            id_type: qualified_type_name(id_type)?,
            key_ops: key_operators(id_type)?,
            chat_is_jsonb: chat_type == pg_sys::JSONBOID,
            sample_percent: None,
            trial: false,
            tuner,
            rows,
        })
    }
}

impl Settings {
    /// The id column qualified with the source's name: in `ORDER BY`, a bare name would
    /// bind to the SELECT's output column of that name, the key printed as text, and sort
    /// integers as '1', '10', '2'.
    pub fn key_column(&self) -> String {
        format!("{}.{}", self.source.name, pgrx::spi::quote_identifier(&self.id_column))
    }

    /// `key > $after AND NOT key > $high` in the key's own type and order ($after NULL:
    /// from the first key), with parameters numbered `after` and `high`.
    pub fn key_range_condition(&self, after: u32, high: u32) -> String {
        let key = self.key_column();
        let t = &self.id_type;
        let gt = self.key_ops.as_ref().map_or("OPERATOR(pg_catalog.>)", |ops| ops.gt.as_str());
        format!(
            "(${after}::pg_catalog.text IS NULL OR {key} {gt} CAST(${after}::pg_catalog.text AS {t})) \
             AND NOT {key} {gt} CAST(${high}::pg_catalog.text AS {t})"
        )
    }

    /// `key = $n` in the key's own type.
    pub fn key_equals(&self, n: u32) -> String {
        let eq = self.key_ops.as_ref().map_or("OPERATOR(pg_catalog.=)", |ops| ops.eq.as_str());
        format!("{} {eq} CAST(${n}::pg_catalog.text AS {})", self.key_column(), self.id_type)
    }
}

/// A new run id, shared by both forms so rejections of different runs never mix.
pub fn next_run_id() -> Result<i64> {
    Spi::get_one::<i64>("SELECT pg_catalog.nextval('chat_backfill.runs_run_id_seq'::pg_catalog.regclass)")?
        .ok_or_else(|| Error::from(pgrx::spi::Error::InvalidPosition))
}

/// `now` as the reference computes it, but fixed for the transaction: its start time in
/// whole epoch seconds.
pub fn transaction_start_epoch() -> i64 {
    // SAFETY: reads the current transaction's start time; no arguments, no allocation.
    let ts = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    // TimestampTz counts microseconds from 2000-01-01; 946684800 is that day in epoch seconds.
    ts.div_euclid(1_000_000) + 946_684_800
}

/// The filter is spliced into our SELECTs as `WHERE (filter) AND (our condition)`, so it must
/// stay one boolean expression that our condition is ANDed with. PostgreSQL's own parser
/// reads the same text with a marker in our condition's place, and must see one plain SELECT
/// of our table whose WHERE is an AND ending in that marker: a filter that closes our
/// parenthesis to add an OR, a comment, a second statement, a UNION, an ORDER BY, a LIMIT or
/// a locking clause changes that shape and is refused.
fn check_filter(source: &Relation, filter: &str) -> Result<()> {
    let refuse = |why: &str| {
        Error::new(
            ERRCODE_SYNTAX_ERROR,
            "source_filter must be one SQL boolean expression",
            "Pass a condition over the source's columns, like user_id NOT LIKE 'shared-%', without ';', \
             comments or clauses of its own; NULL or '' reads every row.",
        )
        .with_detail(why.to_owned())
    };
    const MARKER: &str = "chat_backfill: end of source_filter";
    let sql = format!("SELECT FROM {} WHERE ({filter}) AND \"{MARKER}\"", source.name);
    let sql = CString::new(sql).map_err(|_| refuse("It contains a NUL character."))?;
    // SAFETY: raw_parser only reads the string and returns a List of RawStmt in the current
    // memory context (a syntax error is raised as an ordinary ERROR, 42601); the nodes are
    // only read, each after its tag says what it is.
    let shape = unsafe {
        let list = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() || (*list).length != 1 {
            return Err(refuse("It makes the query hold more than one statement."));
        }
        let stmt = (*((*(*list).elements).ptr_value as *mut pg_sys::RawStmt)).stmt;
        if (*stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
            Err("It turns the query into something other than a SELECT.")
        } else {
            let select = &*(stmt as *mut pg_sys::SelectStmt);
            let plain = select.op == pg_sys::SetOperation::SETOP_NONE
                && select.sortClause.is_null()
                && select.limitCount.is_null()
                && select.limitOffset.is_null()
                && select.lockingClause.is_null()
                && select.withClause.is_null()
                && select.groupClause.is_null()
                && select.havingClause.is_null()
                && select.windowClause.is_null()
                && select.distinctClause.is_null()
                && !select.fromClause.is_null()
                && (*select.fromClause).length == 1;
            if !plain {
                Err("It adds clauses of its own to the query.")
            } else if !ends_with_marker(select.whereClause, MARKER) {
                Err("It is not one expression: it would change how the backfill's own conditions apply.")
            } else {
                Ok(())
            }
        }
    };
    shape.map_err(refuse)
}

/// Whether `clause` is an AND whose last argument is the column reference `"marker"`.
///
/// # Safety
/// `clause` must be null or a node of a raw parse tree.
unsafe fn ends_with_marker(clause: *mut pg_sys::Node, marker: &str) -> bool {
    // SAFETY: each node is read as the type its tag names; lists are read within their length.
    unsafe {
        if clause.is_null() || (*clause).type_ != pg_sys::NodeTag::T_BoolExpr {
            return false;
        }
        let and = &*(clause as *mut pg_sys::BoolExpr);
        if and.boolop != pg_sys::BoolExprType::AND_EXPR || and.args.is_null() || (*and.args).length < 2 {
            return false;
        }
        let last = (*(*and.args).elements.add((*and.args).length as usize - 1)).ptr_value as *mut pg_sys::Node;
        if (*last).type_ != pg_sys::NodeTag::T_ColumnRef {
            return false;
        }
        let fields = (*(last as *mut pg_sys::ColumnRef)).fields;
        if fields.is_null() || (*fields).length != 1 {
            return false;
        }
        let field = (*(*fields).elements).ptr_value as *mut pg_sys::Node;
        if (*field).type_ != pg_sys::NodeTag::T_String {
            return false;
        }
        std::ffi::CStr::from_ptr(crate::pg::version::string_node_chars(field)).to_bytes() == marker.as_bytes()
    }
}
