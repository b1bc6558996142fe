//! The direct path for writing a batch: the batch's datums go into tuple slots and the
//! table access method's multi-insert, then index entries and AFTER ROW triggers (foreign
//! key checks among them), the way COPY FROM does it (copyfrom.c: CopyFrom and
//! CopyMultiInsertBufferFlush), with no text or binary form in between and no input or
//! receive function re-reading values we made (json_recv re-validates every document).
//!
//! Taken only where COPY would do nothing more than that: a plain table that is not a
//! partition, each column written of exactly the type of our datum (text, or varchar
//! without a length; json; boolean; bigint), no BEFORE or INSTEAD OF row trigger, no
//! statement trigger, no transition table, no generated column, and no default on a column
//! not written. Everything else goes through COPY, which handles it (see `copy_feed`).

use std::ffi::c_int;

use pgrx::pg_sys;

/// A batch's rows as datums, field by field.
pub trait DatumSource {
    fn rows(&self) -> usize;
    /// Row `i`'s field `n` as a datum of `value_type(n)` (`None`: NULL); it lives as long
    /// as `self`.
    fn value(&self, n: usize, i: usize) -> Option<pg_sys::Datum>;
    fn value_type(&self, n: usize) -> pg_sys::Oid;
}

/// COPY's own limits for one multi-insert (MAX_BUFFERED_TUPLES, MAX_BUFFERED_BYTES).
const BUFFERED_ROWS: usize = 1000;
const BUFFERED_BYTES: usize = 65535;

/// The live (not dropped) column called `name` in `desc`: its attribute index and attribute.
pub fn column_named<'a>(desc: &'a pgrx::PgTupleDesc<'_>, name: &str) -> Option<(usize, &'a pg_sys::FormData_pg_attribute)> {
    desc.iter().enumerate().find(|(_, a)| !a.attisdropped && a.name() == name)
}

/// Whether a column of `rel` that the batch does not write has a domain type: COPY (and so
/// this path) would store NULL there without checking the domain's constraints, where the
/// caller's own INSERT checks them (a NOT NULL domain refuses the row). Such a target gets
/// the INSERT path.
///
/// # Safety
/// As for `direct_columns`.
pub unsafe fn unwritten_domain(rel: pg_sys::Relation, names: &[&str]) -> bool {
    // SAFETY: the caller holds `rel` open; its tuple descriptor is valid while it does.
    let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att) };
    desc.iter().any(|a| {
        // SAFETY: a syscache lookup of the column's type.
        !a.attisdropped && !names.contains(&a.name()) && unsafe { pg_sys::get_typtype(a.atttypid) } == pg_sys::TYPTYPE_DOMAIN as std::ffi::c_char
    })
}

/// Where each field of `source` goes in the open relation `rel` (its attribute index), if
/// the direct path may write it; `None`: COPY must.
///
/// # Safety
/// `rel` is open and locked against schema changes (RowExclusiveLock) until the write ends.
pub unsafe fn direct_columns(rel: pg_sys::Relation, source: &dyn DatumSource, names: &[&str]) -> Option<Vec<usize>> {
    // SAFETY: the caller holds `rel` open; its relcache entry, trigger descriptor and tuple
    // descriptor stay valid while it does.
    unsafe {
        if (*(*rel).rd_rel).relispartition {
            return None;
        }
        let triggers = (*rel).trigdesc;
        if !triggers.is_null() {
            let t = &*triggers;
            if t.trig_insert_before_row
                || t.trig_insert_instead_row
                || t.trig_insert_before_statement
                || t.trig_insert_after_statement
                || t.trig_insert_new_table
            {
                return None;
            }
        }
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let mut positions = Vec::with_capacity(names.len());
        for (n, name) in names.iter().enumerate() {
            let (at, attribute) = column_named(&desc, name)?;
            let ours = source.value_type(n);
            let same = attribute.atttypid == ours
                || (ours == pg_sys::TEXTOID && attribute.atttypid == pg_sys::VARCHAROID && attribute.atttypmod < 0);
            if !same {
                return None;
            }
            positions.push(at);
        }
        for (at, attribute) in desc.iter().enumerate() {
            if attribute.attisdropped {
                continue;
            }
            // A generated column is computed from the others; a default (of the column, its
            // domain or an identity) is evaluated for a column not written: COPY does both.
            if attribute.attgenerated != 0 {
                return None;
            }
            if !positions.contains(&at) && !pg_sys::build_column_default(rel, at as c_int + 1).is_null() {
                return None;
            }
        }
        Some(positions)
    }
}

/// Writes every row of `source` into `rel` (fields at `positions`, from `direct_columns`);
/// returns the rows written (all of them: no BEFORE trigger can drop one). Raises on any
/// failure (a duplicate id, a constraint, a foreign key): the caller runs it in a
/// subtransaction, whose rollback also ends the trigger query level and releases what this
/// opened.
///
/// # Safety
/// As for `direct_columns`, with `positions` from it for the same `rel` and `source`.
pub unsafe fn insert_direct(rel: pg_sys::Relation, source: &dyn DatumSource, positions: &[usize]) -> u64 {
    // SAFETY: mirrors CopyFrom for a plain table: an executor state for the index and
    // trigger machinery, a ResultRelInfo with the indexes open, the AFTER trigger query
    // level opened before the first row and ended after the last, slots of the relation's
    // own kind whose values point into the batch's memory (alive for the whole call), the
    // multi-insert run in the per-tuple context (it may leak there) and that context reset
    // after each flush. Everything opened is closed below in CopyFrom's order.
    unsafe {
        let natts = (*(*rel).rd_att).natts as usize;
        let relid = (*rel).rd_id;
        let estate = pg_sys::CreateExecutorState();
        let info = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
        // Range table index 0: the relation is not in a range table (as for a trigger's
        // target); only the error detail of a failing row reads it, and that row is then
        // found again by the INSERT path, which reports it.
        pg_sys::InitResultRelInfo(info, rel, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(info, false);
        pg_sys::AfterTriggerBeginQuery();
        let per_tuple = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
        let command = pg_sys::GetCurrentCommandId(true);
        let bulk = pg_sys::GetBulkInsertState();
        let constrained = !(*(*rel).rd_att).constr.is_null();
        let varlena: Vec<bool> = (0..positions.len()).map(|n| !pg_sys::get_typbyval(source.value_type(n))).collect();
        let mut slots: Vec<*mut pg_sys::TupleTableSlot> = Vec::new();
        let mut used = 0usize;
        let mut bytes = 0usize;
        let mut written = 0u64;
        for i in 0..source.rows() {
            pgrx::check_for_interrupts!();
            if used == slots.len() {
                slots.push(pg_sys::table_slot_create(rel, std::ptr::null_mut()));
            }
            let slot = slots[used];
            pg_sys::ExecClearTuple(slot);
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            for (n, &at) in positions.iter().enumerate() {
                if let Some(value) = source.value(n, i) {
                    values[at] = value;
                    nulls[at] = false;
                    bytes += if varlena[n] { pgrx::varsize_any(value.cast_mut_ptr()) } else { 8 };
                }
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            // Constraints may read tableoid.
            (*slot).tts_tableOid = relid;
            if constrained {
                pg_sys::ExecConstraints(info, slot, estate);
            }
            used += 1;
            if used == BUFFERED_ROWS || bytes >= BUFFERED_BYTES {
                written += flush(rel, info, estate, &slots[..used], command, bulk, per_tuple);
                used = 0;
                bytes = 0;
            }
        }
        written += flush(rel, info, estate, &slots[..used], command, bulk, per_tuple);
        pg_sys::FreeBulkInsertState(bulk);
        // Fires the queued AFTER ROW triggers: foreign key checks, deferrable unique rechecks.
        pg_sys::AfterTriggerEndQuery(estate);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        for slot in slots {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        pg_sys::table_finish_bulk_insert(rel, 0);
        pg_sys::ExecCloseIndices(info);
        // Closes the relations the triggers opened.
        pg_sys::ExecCloseResultRelations(estate);
        pg_sys::FreeExecutorState(estate);
        written
    }
}

/// Inserts the rows in `slots`, then their index entries and AFTER ROW trigger events.
///
/// # Safety
/// As in `insert_direct`, whose state this takes.
unsafe fn flush(
    rel: pg_sys::Relation,
    info: *mut pg_sys::ResultRelInfo,
    estate: *mut pg_sys::EState,
    slots: &[*mut pg_sys::TupleTableSlot],
    command: pg_sys::CommandId,
    bulk: pg_sys::BulkInsertState,
    per_tuple: pg_sys::MemoryContext,
) -> u64 {
    if slots.is_empty() {
        return 0;
    }
    // SAFETY: see `insert_direct`; `slots` hold stored virtual tuples of `rel`'s descriptor,
    // and the multi-insert sets each slot's item pointer, which the index entries and the
    // trigger events read.
    unsafe {
        let caller = pg_sys::MemoryContextSwitchTo(per_tuple);
        pg_sys::table_multi_insert(rel, slots.as_ptr().cast_mut(), slots.len() as c_int, command, 0, bulk);
        pg_sys::MemoryContextSwitchTo(caller);
        for &slot in slots {
            let recheck = if (*info).ri_NumIndices > 0 { insert_index_entries(info, slot, estate) } else { std::ptr::null_mut() };
            pg_sys::ExecARInsertTriggers(estate, info, slot, recheck, std::ptr::null_mut());
            pg_sys::list_free(recheck);
            pg_sys::ExecClearTuple(slot);
        }
        pg_sys::MemoryContextReset(per_tuple);
    }
    slots.len() as u64
}

/// ExecInsertIndexTuples for a plain insert (not an update, no ON CONFLICT); 16 added an
/// argument.
///
/// # Safety
/// As in `flush`.
unsafe fn insert_index_entries(
    info: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) -> *mut pg_sys::List {
    // SAFETY: the caller's open ResultRelInfo, inserted slot and executor state.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            pg_sys::ExecInsertIndexTuples(info, slot, estate, false, false, std::ptr::null_mut(), std::ptr::null_mut())
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            pg_sys::ExecInsertIndexTuples(info, slot, estate, false, false, std::ptr::null_mut(), std::ptr::null_mut(), false)
        }
    }
}
