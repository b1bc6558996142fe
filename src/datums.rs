//! Moving text between PostgreSQL and Rust without extra parsing or leaks.
//!
//! `RawJson` hands PostgreSQL `json` exactly as we read it (pgrx 0.18's `JsonString` has
//! no SQL mapping). `OwnedText` reads a text value into a Rust `String` and frees the
//! detoasted copy at once, so a 20 MB chat is not left behind in the caller's context.
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

/// A `text` value copied into Rust; the detoasted copy is freed immediately.
pub struct OwnedText(pub String);

impl FromDatum for OwnedText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, oid: pg_sys::Oid) -> Option<Self> {
        // Borrow (detoasting once), copy, and let the borrow free the detoasted copy.
        unsafe { BorrowedText::from_polymorphic_datum(datum, is_null, oid) }.map(|b| OwnedText(b.as_str().to_owned()))
    }
}

impl IntoDatum for OwnedText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        self.0.into_datum()
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }
}

/// A `text` value read where it lies: detoasted once if it must be, borrowed as `&str`,
/// and the detoasted copy freed on drop. Valid while the tuple it came from is (the SPI
/// session that fetched it).
pub struct BorrowedText {
    data: *const u8,
    len: usize,
    detoasted_copy: *mut pg_sys::varlena,
}

impl BorrowedText {
    pub fn as_str(&self) -> &str {
        // The server encoding is UTF-8 (checked when the backfill starts), and PostgreSQL
        // validated the text on input.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.data, self.len)) }
    }
}

impl Drop for BorrowedText {
    fn drop(&mut self) {
        if !self.detoasted_copy.is_null() {
            unsafe { pg_sys::pfree(self.detoasted_copy.cast()) };
        }
    }
}

impl FromDatum for BorrowedText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        unsafe {
            let varlena = datum.cast_mut_ptr::<pg_sys::varlena>();
            let detoasted = pg_sys::pg_detoast_datum_packed(varlena);
            Some(BorrowedText {
                data: pgrx::varlena::vardata_any(detoasted) as *const u8,
                len: pgrx::varlena::varsize_any_exhdr(detoasted),
                detoasted_copy: if detoasted != varlena { detoasted } else { std::ptr::null_mut() },
            })
        }
    }
}

impl IntoDatum for BorrowedText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(text_datum(self.as_str()))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }
}

/// A new `text` datum holding `s`, in the current memory context.
pub fn text_datum(s: &str) -> pg_sys::Datum {
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
    unsafe { build_array(datums, nulls, pg_sys::BOOLOID, 1, true, pg_sys::TYPALIGN_CHAR as c_char) }
}

pub fn int8_array(values: &[i64]) -> pg_sys::Datum {
    let datums = values.iter().map(|&v| pg_sys::Datum::from(v)).collect();
    let nulls = vec![false; values.len()];
    unsafe { build_array(datums, nulls, pg_sys::INT8OID, 8, true, pg_sys::TYPALIGN_DOUBLE as c_char) }
}

unsafe fn build_array(
    mut datums: Vec<pg_sys::Datum>,
    mut nulls: Vec<bool>,
    element: pg_sys::Oid,
    typlen: i32,
    byval: bool,
    align: c_char,
) -> pg_sys::Datum {
    if datums.is_empty() {
        return pg_sys::Datum::from(unsafe { pg_sys::construct_empty_array(element) });
    }
    let mut dims = [datums.len() as i32];
    let mut lower_bounds = [1];
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
