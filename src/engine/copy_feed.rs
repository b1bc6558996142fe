//! The fast path for writing a batch: PostgreSQL's own COPY FROM, fed row by row from
//! the batch through a data-source callback. COPY inserts in multi-row groups and is the
//! physical floor for loading rows; it has no ON CONFLICT, so a batch it rejects for any
//! reason (an id already present, a constraint) is rolled back by the caller and written
//! again through the INSERT ... ON CONFLICT path, which isolates bad rows.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};

use pgrx::pg_sys;

use crate::engine::direct_insert::{column_named, direct_columns, insert_direct, unwritten_domain, DatumSource};


/// Rows to feed, produced on demand row by row, in COPY's text or binary format (or as
/// datums, for the direct path).
pub trait CopySource: DatumSource {
    /// Appends row `i` as one line of COPY's text format, newline included.
    fn write_line(&self, i: usize, out: &mut Vec<u8>);
    /// Appends row `i` as one tuple of COPY's binary format (its field count, then each field
    /// as a length and the bytes of its type's binary form); `jsonb[n]`: field `n` goes to a
    /// jsonb column, whose binary form starts with a version byte.
    fn write_binary(&self, i: usize, jsonb: &[bool], out: &mut Vec<u8>);
}

/// The start of COPY's binary format: its signature, no flags, no header extension.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Its end: a field count of -1.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// The callback has no user-data argument: the feed lives here for the duration of one
/// CopyFrom (a backend is single-threaded and COPY does not nest).
struct Feed {
    source: *const dyn CopySource,
    /// Binary format: which fields go to jsonb columns; `None`: text format.
    binary: Option<Vec<bool>>,
    next_row: usize,
    pending: Vec<u8>,
    offset: usize,
    /// Binary format: whether the trailer has been fed.
    ended: bool,
}

thread_local! {
    static FEED: RefCell<Option<Feed>> = const { RefCell::new(None) };
}

/// `pg_guard`: a Rust panic here becomes a PostgreSQL ERROR instead of unwinding into C.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_feed(outbuf: *mut c_void, _minread: c_int, maxread: c_int) -> c_int {
    FEED.with(|feed| {
        let mut feed = feed.borrow_mut();
        let Some(feed) = feed.as_mut() else { return 0 };
        // SAFETY: `copy_rows` set the pointer from a reference that outlives the CopyFrom
        // call this callback runs in, and clears it before returning.
        let source = unsafe { &*feed.source };
        let mut written = 0usize;
        let want = maxread as usize;
        while written < want {
            if feed.offset == feed.pending.len() {
                feed.pending.clear();
                feed.offset = 0;
                if feed.next_row == source.rows() {
                    if feed.binary.is_none() || feed.ended {
                        break;
                    }
                    feed.pending.extend_from_slice(BINARY_TRAILER);
                    feed.ended = true;
                }
                // A few rows at a time keeps the buffer small and the calls few.
                while feed.pending.len() < 64 * 1024 && feed.next_row < source.rows() {
                    match &feed.binary {
                        Some(jsonb) => source.write_binary(feed.next_row, jsonb, &mut feed.pending),
                        None => source.write_line(feed.next_row, &mut feed.pending),
                    }
                    feed.next_row += 1;
                }
            }
            let n = (feed.pending.len() - feed.offset).min(want - written);
            // SAFETY: COPY hands a buffer of `maxread` bytes; `written + n <= maxread`.
            unsafe {
                std::ptr::copy_nonoverlapping(feed.pending.as_ptr().add(feed.offset), (outbuf as *mut u8).add(written), n);
            }
            feed.offset += n;
            written += n;
        }
        written as c_int
    })
}

/// Whether COPY may write to `target` for this caller and do exactly what INSERT would:
/// a plain table, INSERT granted on the whole table, no row-level security (COPY refuses
/// it), no rules (COPY ignores them), a read-write transaction, and no COPY of ours already
/// feeding (a trigger that runs a backfill). Otherwise only the INSERT path runs, so
/// PostgreSQL applies its exact rules (column grants, policies, rules). Asked before every
/// batch: a long committing run sees a REVOKE or a new policy at its next batch.
pub fn copy_allowed(target: pg_sys::Oid) -> bool {
    if FEED.with(|f| f.borrow().is_some()) {
        return false;
    }
    // SAFETY: catalog lookups on an existing relation; the relcache entry is opened and
    // closed here, and `rd_rel` is read while it is open.
    unsafe {
        if pg_sys::XactReadOnly {
            return false;
        }
        let granted = pg_sys::pg_class_aclcheck(target, pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK;
        let rel = pg_sys::RelationIdGetRelation(target);
        if rel.is_null() {
            return false;
        }
        let form = &*(*rel).rd_rel;
        let plain = form.relkind == pg_sys::RELKIND_RELATION as c_char && !form.relrowsecurity && !form.relhasrules;
        pg_sys::RelationClose(rel);
        granted && plain
    }
}

/// COPY `source`'s rows into `target`'s chat_message columns; returns the rows written and
/// the path taken (as the status view names it).
/// Raises on any failure (the caller runs it in a subtransaction). Where the locked table
/// allows it (`direct_columns`), the rows go straight in (`insert_direct`) instead: the same
/// writes as COPY's without a format in between.
/// `types`, the columns' types when the run checked the target, allows COPY's binary
/// format: no escaping on our side and no line parsing on COPY's (each value goes straight
/// to its type's receive function, which validates it as its input function would). Taken
/// only where every column still has that type once the table is locked (a binary value
/// read as another type is silently wrong: an int8 taken for a timestamp), and where the
/// session's client encoding is the database's (the text and json receive functions convert
/// from the client encoding, which the text format's ENCODING option cannot override for
/// them). Otherwise the text format, whose input functions parse each value as the column
/// is now.
pub fn copy_rows(
    target: pg_sys::Oid,
    source: &dyn CopySource,
    names: &[&str],
    types: Option<&[pg_sys::Oid]>,
) -> (u64, &'static str) {
    let source: *const (dyn CopySource + '_) = source;
    // SAFETY: only erases the lifetime; the pointer is used only while this call runs,
    // and FEED is cleared on every way out (ClearFeed).
    let source: *const dyn CopySource = unsafe { std::mem::transmute(source) };
    struct ClearFeed;
    impl Drop for ClearFeed {
        fn drop(&mut self) {
            FEED.with(|f| *f.borrow_mut() = None);
        }
    }
    let columns = column_list(names);
    // SAFETY: the relation is opened and locked as COPY FROM does (the lock also keeps its
    // column types as read below until the COPY ends); the options and column list are built
    // in the current memory context; COPY reads only through `read_feed`.
    unsafe {
        let lockmode = pg_sys::RowExclusiveLock as c_int;
        let rel = pg_sys::table_open(target, lockmode);
        if unwritten_domain(rel, names) {
            // Refused inside the caller's subtransaction (a class it catches: never shown):
            // the batch goes to the INSERT path.
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION,
                "chat_backfill: a column not written has a domain type, whose constraints only INSERT checks"
            );
        }
        if let Some(positions) = direct_columns(rel, &*source, names) {
            pgrx::debug1!("chat_backfill: direct insert of {} rows", (*source).rows());
            let written = insert_direct(rel, &*source, &positions);
            pg_sys::table_close(rel, pg_sys::NoLock as c_int);
            pg_sys::CommandCounterIncrement();
            return (written, "direct");
        }
        let binary = types.filter(|t| client_encoding_is_databases() && current_types(rel, names) == *t).map(|t| {
            t.iter().map(|&oid| oid == pg_sys::JSONBOID).collect::<Vec<bool>>()
        });
        pgrx::debug1!(
            "chat_backfill: COPY of {} rows in {} format",
            (*source).rows(),
            if binary.is_some() { "binary" } else { "text" }
        );
        let binary_taken = binary.is_some();
        let options = if binary_taken { binary_option() } else { utf8_option() };
        let pending = if binary.is_some() { BINARY_HEADER.to_vec() } else { Vec::new() };
        FEED.with(|f| *f.borrow_mut() = Some(Feed { source, binary, next_row: 0, pending, offset: 0, ended: false }));
        let _clear = ClearFeed;
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let item = pg_sys::addRangeTableEntryForRelation(pstate, rel, lockmode, std::ptr::null_mut(), false, false);
        crate::pg::version::require_insert(pstate, item);
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_feed),
            columns,
            options,
        );
        let written = pg_sys::CopyFrom(cstate);
        // A trigger, default or check of the target that changed client_encoding made the
        // binary values after it be converted as that encoding: the batch is refused (its
        // subtransaction rolls it back) and goes to the INSERT path, which sends datums.
        if binary_taken && !client_encoding_is_databases() {
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
                "chat_backfill: client_encoding changed during a COPY in binary format"
            );
        }
        pg_sys::EndCopyFrom(cstate);
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as c_int);
        pg_sys::CommandCounterIncrement();
        (written, if binary_taken { "copy binary" } else { "copy text" })
    }
}

/// Whether the session's client encoding is the database's (what the binary format needs).
fn client_encoding_is_databases() -> bool {
    // SAFETY: reads two backend globals.
    unsafe { pg_sys::pg_get_client_encoding() == pg_sys::GetDatabaseEncoding() }
}

/// The type of each named column of the open relation `rel` (InvalidOid: no such column).
///
/// # Safety
/// `rel` is open.
unsafe fn current_types(rel: pg_sys::Relation, names: &[&str]) -> Vec<pg_sys::Oid> {
    // SAFETY: the caller holds `rel` open, so its tuple descriptor is valid while this runs;
    // the wrapper neither releases nor frees it (its attribute layout differs by major, which
    // the wrapper knows).
    let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att) };
    names
        .iter()
        .map(|name| column_named(&desc, name).map_or(pg_sys::InvalidOid, |(_, a)| a.atttypid))
        .collect()
}

/// The columns written, as COPY's column list.
fn column_list(names: &[&str]) -> *mut pg_sys::List {
    let mut columns: *mut pg_sys::List = std::ptr::null_mut();
    for name in names {
        let name = CString::new(*name).unwrap_or_default();
        // SAFETY: pstrdup copies the name into the current memory context, which the
        // List and its String nodes also live in.
        columns = unsafe { pg_sys::lappend(columns, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast()) };
    }
    columns
}

/// `(ENCODING 'UTF8')`: our lines are UTF-8 whatever the session's client_encoding, which
/// COPY would otherwise convert them from.
fn utf8_option() -> *mut pg_sys::List {
    // SAFETY: builds a one-element List of a DefElem in the current memory context.
    unsafe {
        let value = pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr()));
        let option = pg_sys::makeDefElem(pg_sys::pstrdup(c"encoding".as_ptr()), value.cast(), -1);
        pg_sys::lappend(std::ptr::null_mut(), option.cast())
    }
}

/// `(FORMAT binary)`.
fn binary_option() -> *mut pg_sys::List {
    // SAFETY: builds a one-element List of a DefElem in the current memory context.
    unsafe {
        let value = pg_sys::makeString(pg_sys::pstrdup(c"binary".as_ptr()));
        let option = pg_sys::makeDefElem(pg_sys::pstrdup(c"format".as_ptr()), value.cast(), -1);
        pg_sys::lappend(std::ptr::null_mut(), option.cast())
    }
}

/// Appends one field of COPY's binary format: its length, then its bytes (`prefix` first,
/// if any: jsonb's version byte).
pub fn push_binary_field(out: &mut Vec<u8>, prefix: &[u8], bytes: &[u8]) {
    let len = i32::try_from(prefix.len() + bytes.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(bytes);
}

/// A NULL field of COPY's binary format.
pub fn push_binary_null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

/// Appends `s` escaped for COPY's text format.
pub fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}
