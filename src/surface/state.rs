//! The run state's SQL: the `chat_backfill` schema and its tables, views, policies and
//! helpers (sql/state.sql, runs.sql, parallel.sql, guard.sql, in that order), the function
//! the policies ask whether a role sees a chat, and the event triggers that keep a role that
//! is not a superuser from changing the state tables (`engine::state_guard`).

use pgrx::prelude::*;

use crate::pg::error::OrRaise;

extension_sql_file!("../../sql/state.sql", name = "state_schema", bootstrap);

/// Whether a row of `source` whose `id_column` is `chat_id` (a key as the backfill writes it:
/// its text under the pinned settings of `key_text`) is visible to the calling role. A
/// table or column that no longer exists, or a key that no longer parses as the column's
/// type, shows nothing.
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.chat_visible(source pg_catalog.oid, id_column pg_catalog.text, chat_id pg_catalog.text)
RETURNS pg_catalog.bool STRICT STABLE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn chat_visible(source: pg_sys::Oid, id_column: &str, chat_id: &str) -> bool {
    crate::pg::visibility::visible(source, id_column, chat_id).or_raise()
}

extension_sql_file!("../../sql/runs.sql", name = "runs_state", requires = ["state_schema", chat_visible]);

extension_sql_file!("../../sql/parallel.sql", name = "parallel_state", requires = ["runs_state"]);

/// Notes the state's definition before a DDL command of a role that is not a superuser.
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.state_ddl_start() RETURNS pg_catalog.event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn state_ddl_start(fcinfo: pg_sys::FunctionCallInfo) {
    if crate::engine::state_guard::watched() {
        // SAFETY: an event trigger's function is called with its EventTriggerData as the
        // context; anything else gives no parse tree.
        let tree = unsafe {
            let context = (*fcinfo).context;
            if !context.is_null() && pgrx::is_a(context, pg_sys::NodeTag::T_EventTriggerData) {
                (*context.cast::<pg_sys::EventTriggerData>()).parsetree
            } else {
                std::ptr::null_mut()
            }
        };
        crate::engine::state_guard::refuse_concurrent_drop(tree).or_raise();
        crate::engine::state_guard::note_before().or_raise();
    }
}

/// Refuses the command if it changed the state's definition away from the record.
#[pg_extern(
    sql = r#"
CREATE FUNCTION chat_backfill.state_ddl_end() RETURNS pg_catalog.event_trigger
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#,
    requires = ["state_schema"]
)]
fn state_ddl_end() {
    if crate::engine::state_guard::watched() {
        crate::engine::state_guard::refuse_changes().or_raise();
    }
}

extension_sql_file!("../../sql/guard.sql", name = "state_guard", finalize);
