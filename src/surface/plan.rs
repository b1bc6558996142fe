//! `chat_backfill.plan()`: what a backfill will cost and whether the target is set up for
//! it, one row per finding (`planning::plan`).

use pgrx::datum::AnyNumeric;
use pgrx::prelude::*;

use crate::engine::request::Request;
use crate::pg::error::OrRaise;

/// Estimates and checks for a backfill of `source` into `target` with these arguments, in
/// either row mode. Writes nothing to the target: the trial's rows go to a temporary table,
/// rolled back with it.
#[allow(clippy::too_many_arguments)]
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.plan(
    source regclass DEFAULT NULL,
    target regclass DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    source_filter text DEFAULT $$user_id OPERATOR(pg_catalog.!~~) 'shared-%'::pg_catalog.text$$,
    id_column text DEFAULT 'id',
    user_id_column text DEFAULT 'user_id',
    chat_column text DEFAULT 'chat',
    "rows" text DEFAULT 'migration')
RETURNS TABLE (item text, status text, value numeric, unit text, detail text, advice text)
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn plan(
    source: Option<pg_sys::Oid>,
    target: Option<pg_sys::Oid>,
    batch_size: Option<i32>,
    source_filter: Option<&str>,
    id_column: Option<&str>,
    user_id_column: Option<&str>,
    chat_column: Option<&str>,
    rows: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(item, String),
        name!(status, String),
        name!(value, Option<AnyNumeric>),
        name!(unit, Option<String>),
        name!(detail, String),
        name!(advice, Option<String>),
    ),
> {
    let request = Request { batch_size, source_filter, ..Request::new(source, target) }
        .columns(id_column, user_id_column, chat_column)
        .rows(rows);
    let findings = crate::planning::plan::findings(request).or_raise();
    TableIterator::new(findings.into_iter().map(|f| {
        (f.item.to_owned(), f.status.to_owned(), f.value, f.unit.map(str::to_owned), f.detail, f.advice)
    }))
}
