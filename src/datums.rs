//! Moving text between PostgreSQL and Rust without extra parsing or leaks.
//!
//! `RawJson` hands PostgreSQL `json` exactly as we read it (pgrx 0.18's `JsonString` has
//! no SQL mapping). `ChatText` holds one chat document, detoasted once, for as long as the
//! engine needs it and no longer.
//! `varlena_array` and friends build the array parameters of the batch INSERT straight
//! from slices of the batch, so a retried half-batch needs no copy of its rows.

use std::ffi::c_char;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{FromDatum, IntoDatum};

pub struct RawJson(pub String);

impl IntoDatum for RawJson {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        self.0.as_str().into_datum()
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONOID
    }
}

unsafe impl SqlTranslatable for RawJson {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RawJson);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("json"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("json")));
}

unsafe impl BoxRet for RawJson {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

/// A chat document held in a memory context of its own: detoasted there once (or, when
/// it was stored inline, copied there), so it outlives the SPI session that fetched it and,
/// in the committing form, the transaction: a chat too big for one batch is expanded over
/// several without being read again. The context goes when this does, on every way out
/// (pgrx unwinds Rust frames on ERROR, and drops an SRF's state with its memory context).
pub struct ChatText {
    context: pg_sys::MemoryContext,
    data: *const u8,
    len: usize,
    /// Checked once, so `as_str` costs nothing however often a big chat is resumed.
    utf8: bool,
}

impl ChatText {
    /// The document, or `None` if it is not UTF-8 (impossible in the UTF8 databases the
    /// backfill insists on; never trusted blindly).
    pub fn as_str(&self) -> Option<&str> {
        if !self.utf8 {
            return None;
        }
        // SAFETY: `data[..len]` lives in `self.context` until drop, and was checked to be
        // UTF-8 when this was made.
        Some(unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.data, self.len)) })
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ChatText {
    fn drop(&mut self) {
        // SAFETY: the context was created for this value alone and nothing else points into it.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

impl FromDatum for ChatText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a new context, owned by the value made right away, so that an ERROR while
        // detoasting (which unwinds through here) drops the value and deletes the context.
        let context = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"chat_backfill chat".as_ptr(),
                0,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        let mut text = ChatText { context, data: std::ptr::null(), len: 0, utf8: false };
        // SAFETY: the caller passes a non-null datum of a varlena type (the source query casts
        // the chat to text); detoasting or copying allocates in `text`'s context.
        unsafe {
            let caller = pg_sys::MemoryContextSwitchTo(context);
            let stored = datum.cast_mut_ptr::<pg_sys::varlena>();
            let guard = RestoreContext(caller);
            let mut own = pg_sys::pg_detoast_datum_packed(stored);
            if own == stored {
                // Stored inline in the fetched tuple, which goes with the SPI session.
                let size = pgrx::varlena::varsize_any(stored);
                own = pg_sys::palloc(size).cast();
                std::ptr::copy_nonoverlapping(stored.cast::<u8>(), own.cast::<u8>(), size);
            }
            drop(guard);
            text.data = pgrx::varlena::vardata_any(own) as *const u8;
            text.len = pgrx::varlena::varsize_any_exhdr(own);
            text.utf8 = std::str::from_utf8(std::slice::from_raw_parts(text.data, text.len)).is_ok();
        }
        Some(text)
    }
}

/// Switches back to the caller's memory context on every way out.
struct RestoreContext(pg_sys::MemoryContext);

impl Drop for RestoreContext {
    fn drop(&mut self) {
        // SAFETY: the context was current when this was made and outlives it.
        unsafe { pg_sys::MemoryContextSwitchTo(self.0) };
    }
}

/// `SpiHeapTupleData::get` wants the type it reads as: chats are read as `text`, or as
/// `json` or `varchar` columns as they are (their values are their text), so that reading
/// a json column costs no output/input conversion and no copy before ours.
impl IntoDatum for ChatText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        self.as_str().map(text_datum)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }

    fn is_compatible_with(other: pg_sys::Oid) -> bool {
        [pg_sys::TEXTOID, pg_sys::VARCHAROID, pg_sys::JSONOID].contains(&other)
    }
}

/// A new `text` datum holding `s`, in the current memory context.
pub fn text_datum(s: &str) -> pg_sys::Datum {
    // SAFETY: copies `s.len()` bytes of a live `&str` into a new palloc'd text; values
    // handed here are slices of one document, which PostgreSQL already bounds to 1 GB.
    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(s.as_ptr() as *const c_char, s.len() as i32) })
}

/// The contents of a `text` datum made by `text_datum` (never toasted).
///
/// # Safety
/// `d` must be a valid, untoasted text datum that outlives the returned `&str`.
pub unsafe fn text_str<'a>(d: pg_sys::Datum) -> &'a str {
    unsafe {
        let v = d.cast_mut_ptr::<pg_sys::varlena>();
        let bytes = std::slice::from_raw_parts(pgrx::varlena::vardata_any(v) as *const u8, pgrx::varlena::varsize_any_exhdr(v));
        std::str::from_utf8_unchecked(bytes)
    }
}

/// A one-dimensional array of existing varlena datums (`None` is NULL); elements are
/// copied into the array once.
pub fn datum_array(values: &[Option<pg_sys::Datum>], element: pg_sys::Oid) -> pg_sys::Datum {
    let datums = values.iter().map(|v| v.unwrap_or(pg_sys::Datum::from(0))).collect();
    let nulls = values.iter().map(Option::is_none).collect();
    // SAFETY: every non-null element is a valid varlena datum of `element`'s type.
    unsafe { build_array(datums, nulls, element, -1, false, pg_sys::TYPALIGN_INT as c_char) }
}

/// A one-dimensional array of a varlena type whose binary form is its text (`text`,
/// `json`): elements are copied once, never parsed.
pub fn varlena_array<'a>(values: impl ExactSizeIterator<Item = Option<&'a str>>, element: pg_sys::Oid) -> pg_sys::Datum {
    let datums: Vec<Option<pg_sys::Datum>> = values.map(|v| v.map(text_datum)).collect();
    datum_array(&datums, element)
}

pub fn bool_array(values: &[Option<bool>]) -> pg_sys::Datum {
    let datums = values.iter().map(|v| pg_sys::Datum::from(v.unwrap_or(false))).collect();
    let nulls = values.iter().map(Option::is_none).collect();
    // SAFETY: by-value booleans, with bool's length and alignment.
    unsafe { build_array(datums, nulls, pg_sys::BOOLOID, 1, true, pg_sys::TYPALIGN_CHAR as c_char) }
}

pub fn int8_array(values: &[i64]) -> pg_sys::Datum {
    let datums = values.iter().map(|&v| pg_sys::Datum::from(v)).collect();
    let nulls = vec![false; values.len()];
    // SAFETY: by-value int8s, with int8's length and alignment.
    unsafe { build_array(datums, nulls, pg_sys::INT8OID, 8, true, pg_sys::TYPALIGN_DOUBLE as c_char) }
}

/// # Safety
/// `datums` must hold valid values of `element` (described by `typlen`, `byval`, `align`)
/// wherever `nulls` is false.
unsafe fn build_array(
    mut datums: Vec<pg_sys::Datum>,
    mut nulls: Vec<bool>,
    element: pg_sys::Oid,
    typlen: i32,
    byval: bool,
    align: c_char,
) -> pg_sys::Datum {
    if datums.is_empty() {
        // SAFETY: allocates an empty array of a built-in element type.
        return pg_sys::Datum::from(unsafe { pg_sys::construct_empty_array(element) });
    }
    let mut dims = [datums.len() as i32];
    let mut lower_bounds = [1];
    // SAFETY: one dimension of `datums.len()` elements; the caller vouches for the values.
    let array = unsafe {
        pg_sys::construct_md_array(
            datums.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lower_bounds.as_mut_ptr(),
            element,
            typlen,
            byval,
            align,
        )
    };
    pg_sys::Datum::from(array)
}
