//! Whether the calling role can see one chat of a source through the source's own
//! row-level security: the check behind the run state's policies (`chat_backfill.may_read`),
//! so that a role the source shows no chat to sees no rejection, key or run about it.
//! Asked only where the source's row-level security applies to the caller; it looks with
//! the caller's own rights, as a SELECT of theirs would.

use pgrx::prelude::*;

use crate::pg::catalog::{column_types, key_operators, qualified_type_name, resolve};
use crate::pg::error::Result;

/// Whether a row of `source` whose `id_column` is `chat_id` (a key as the backfill writes it:
/// its text under the pinned settings of `key_text`) is visible to the calling role. A
/// table or column that no longer exists, or a key that no longer parses as the column's
/// type, shows nothing.
pub(crate) fn visible(source: pg_sys::Oid, id_column: &str, chat_id: &str) -> Result<bool> {
    let Ok(relation) = resolve(Some(source), "", "source") else { return Ok(false) };
    let Some(type_oid) = column_types(&relation, &[id_column])?[0] else { return Ok(false) };
    let column = crate::pg::read_only::get_one::<String>("SELECT pg_catalog.quote_ident($1::pg_catalog.text)", &[id_column.into()])?
        .unwrap_or_default();
    // The key's own equality (an index on it serves the lookup); a type without one is
    // compared as the text the backfill wrote.
    // A domain's CHECK runs when a value becomes the domain, with the reader's rights, and
    // a role that owns the domain may change it at any time: cast to its base type instead.
    // A base type of another kind than a plain one (only a superuser creates those), or an
    // array (its input makes each element its type, a domain's CHECK included), is compared
    // as text, whose output runs no CHECK.
    // SAFETY: syscache lookups of an existing type.
    let (base, plain) = unsafe {
        let base = pg_sys::getBaseType(type_oid);
        let plain = pg_sys::get_typtype(base) == pg_sys::TYPTYPE_BASE as std::ffi::c_char
            && pg_sys::get_element_type(base) == pg_sys::InvalidOid;
        (base, plain)
    };
    let type_oid = base;
    let ops = if plain { key_operators(type_oid)? } else { None };
    let condition = match ops {
        Some(ops) => format!("s.{column} {} CAST($1::pg_catalog.text AS {})", ops.eq, qualified_type_name(type_oid)?),
        None => format!("s.{column}::pg_catalog.text OPERATOR(pg_catalog.=) $1::pg_catalog.text"),
    };
    let query = format!("SELECT EXISTS (SELECT FROM {} s WHERE {condition})", relation.name);
    let chat_id = chat_id.to_owned();
    let found = crate::pg::key_text::pinned(|| {
        crate::pg::subxact::in_subtransaction(move || {
            crate::pg::read_only::get_one::<bool>(&query, &[chat_id.as_str().into()])
        })
    });
    Ok(match found {
        Ok(seen) => seen?.unwrap_or(false),
        // The key no longer parses as the column's type (it was changed): nothing to show.
        Err(_) => false,
    })
}
