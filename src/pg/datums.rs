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

use crate::pg::toast_read::ToastStream;

/// `json` handed to PostgreSQL as it is, in the database's encoding (`to_server`).
pub struct RawJson(pub Vec<u8>);

/// `text` handed to PostgreSQL as it is, in the database's encoding (`to_server`).
pub struct ServerText(pub Vec<u8>);

macro_rules! bytes_out {
    ($type:ident, $oid:expr, $sql:literal) => {
        impl IntoDatum for $type {
            fn into_datum(self) -> Option<pg_sys::Datum> {
                // SAFETY: copies the bytes of a live Vec into a new palloc'd varlena.
                Some(pg_sys::Datum::from(unsafe {
                    pg_sys::cstring_to_text_with_len(self.0.as_ptr() as *const c_char, self.0.len() as i32)
                }))
            }

            fn type_oid() -> pg_sys::Oid {
                $oid
            }
        }

        unsafe impl SqlTranslatable for $type {
            const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!($type);
            const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
            const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal($sql));
            const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal($sql)));
        }

        unsafe impl BoxRet for $type {
            unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
                match self.into_datum() {
                    Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
                    None => fcinfo.return_null(),
                }
            }
        }
    };
}
bytes_out!(RawJson, pg_sys::JSONOID, "json");
bytes_out!(ServerText, pg_sys::TEXTOID, "text");

/// A `text` argument as UTF-8, whatever the database's encoding: `None` inside when it cannot
/// be read as UTF-8 (a SQL_ASCII database holds any bytes), so the caller can say so
/// instead of failing on the value.
pub struct ArgText(pub Option<String>);

impl FromDatum for ArgText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null text datum; detoasting allocates in the current memory context,
        // and the bytes are copied out before it goes.
        let bytes = unsafe {
            let own = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr::<pg_sys::varlena>());
            std::slice::from_raw_parts(pgrx::varlena::vardata_any(own) as *const u8, pgrx::varlena::varsize_any_exhdr(own))
        };
        Some(ArgText(from_server(bytes)))
    }
}

unsafe impl SqlTranslatable for ArgText {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(ArgText);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("TEXT"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("TEXT")));
}

unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for ArgText {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the argument is a text datum, as the SQL signature says.
        unsafe { arg.unbox_arg_using_from_datum().unwrap_or_else(|| panic!("argument {index} must not be null")) }
    }
}

/// A `regclass` argument as the oid it holds, unchecked: the engine resolves it and says
/// 42P01 when nothing has that oid (any more), where opening it here would fail with XX000.
pub struct RegClass(pub pg_sys::Oid);

impl FromDatum for RegClass {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then(|| RegClass(pg_sys::Oid::from(datum.value() as u32)))
    }
}

unsafe impl SqlTranslatable for RegClass {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RegClass);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("regclass"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("regclass")));
}

unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for RegClass {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the argument is a regclass datum (an oid, by value), as the SQL signature says.
        unsafe { arg.unbox_arg_using_from_datum().unwrap_or_else(|| panic!("argument {index} must not be null")) }
    }
}

/// The database's encoding.
fn server_encoding() -> i32 {
    // SAFETY: reads a backend global that is fixed for the session.
    unsafe { pg_sys::GetDatabaseEncoding() }
}

/// Whether the database takes any UTF-8 text as it is (UTF8, or SQL_ASCII, which holds bytes).
pub fn server_takes_utf8() -> bool {
    [pg_sys::pg_enc::PG_UTF8 as i32, pg_sys::pg_enc::PG_SQL_ASCII as i32].contains(&server_encoding())
}

/// `s` in the database's encoding; `None` when a character of it has no equivalent there.
/// (A UTF8 or SQL_ASCII database takes Rust's UTF-8 as it is.)
pub fn to_server(s: &str) -> Option<Vec<u8>> {
    convert(s.as_bytes(), pg_sys::pg_enc::PG_UTF8 as i32, server_encoding())
}

/// Text in the database's encoding as UTF-8; `None` when it is not valid UTF-8 after that.
pub fn from_server(bytes: &[u8]) -> Option<String> {
    let utf8 = convert(bytes, server_encoding(), pg_sys::pg_enc::PG_UTF8 as i32)?;
    String::from_utf8(utf8).ok()
}

/// `src` converted from encoding `from` to `to` by PostgreSQL's own conversion, without
/// raising: `None` where a character does not convert. In slices of 64 kB (the conversion
/// needs four times its input in one buffer), each ending on a character of `from`.
fn convert(src: &[u8], from: i32, to: i32) -> Option<Vec<u8>> {
    let sql_ascii = pg_sys::pg_enc::PG_SQL_ASCII as i32;
    if from == to || from == sql_ascii || to == sql_ascii {
        return Some(src.to_vec());
    }
    // SAFETY: a catalog lookup by two encoding numbers.
    let proc = unsafe { pg_sys::FindDefaultConversionProc(from, to) };
    if proc == pg_sys::InvalidOid {
        return None;
    }
    const SLICE: usize = 1 << 16;
    let mut buffer = vec![0u8; 4 * (SLICE + 8) + 8];
    let mut out = Vec::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        pgrx::check_for_interrupts!();
        let mut n = 0;
        while n < rest.len().min(SLICE) {
            // SAFETY: reads the lead byte of a character inside `rest`.
            n += unsafe { pg_sys::pg_encoding_mblen(from, rest[n..].as_ptr() as *const c_char) }.max(1) as usize;
        }
        let n = n.min(rest.len());
        // SAFETY: the conversion reads `n` bytes of `rest` and writes at most 4n + 1 bytes,
        // NUL-terminated, into `buffer`, which holds more; with noError it stops at the first
        // character it cannot convert and returns how far it got instead of raising.
        let converted = unsafe {
            pg_sys::pg_do_encoding_conversion_buf(
                proc,
                from,
                to,
                rest.as_ptr() as *mut u8,
                n as i32,
                buffer.as_mut_ptr(),
                buffer.len() as i32,
                true,
            )
        };
        if converted as usize != n {
            return None;
        }
        let len = buffer.iter().position(|&b| b == 0).unwrap_or(0);
        out.extend_from_slice(&buffer[..len]);
        rest = &rest[n..];
    }
    Some(out)
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

impl ChatText {
    /// A value without text yet, in a new context of its own: made first, so that an ERROR
    /// while its text is read (which unwinds through the reader) drops it and deletes the context.
    fn empty() -> ChatText {
        // SAFETY: a new context under TopMemoryContext, owned by the value made right away.
        let context = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"chat_backfill chat".as_ptr(),
                0,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        ChatText { context, data: std::ptr::null(), len: 0, utf8: false }
    }

    /// The whole text of a TOASTed chat, read through `stream` from its start: a chat that
    /// is not streamed after all (app rows, a document that is not an object) held once,
    /// without the compressed copy detoasting holds beside it.
    pub fn read_whole(stream: &mut ToastStream) -> crate::pg::error::Result<ChatText> {
        let mut text = ChatText::empty();
        let size = stream.raw_size();
        // SAFETY: `size` bytes in the value's own context; the stream hands out exactly the
        // document's decompressed size (its decoder checks), never more than is copied here.
        unsafe {
            let data = pg_sys::MemoryContextAlloc(text.context, size.max(1)).cast::<u8>();
            let mut filled = 0usize;
            while stream.next_slice(&mut |piece: &[u8]| {
                let n = piece.len().min(size - filled);
                std::ptr::copy_nonoverlapping(piece.as_ptr(), data.add(filled), n);
                filled += n;
            })? {}
            text.data = data;
            text.len = filled;
            text.utf8 = std::str::from_utf8(std::slice::from_raw_parts(text.data, text.len)).is_ok();
        }
        Ok(text)
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
        let mut text = ChatText::empty();
        let context = text.context;
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

/// A chat as read from the source: held (detoasted, or stored in the row), or, when it
/// lies in a TOAST table and is bigger than `chat_backfill.stream_chats_over`, a stream
/// over it, read a slice at a time (issue 26: memory no longer follows the largest chat).
pub enum Chat {
    Held(ChatText),
    Toasted(ToastStream),
}

impl Chat {
    /// The text's size, decompressed.
    pub fn len(&self) -> usize {
        match self {
            Chat::Held(text) => text.len(),
            Chat::Toasted(stream) => stream.raw_size(),
        }
    }
}

impl FromDatum for Chat {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, oid: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null varlena datum of the row fetched (as for ChatText).
        match unsafe { ToastStream::of(datum.cast_mut_ptr()) } {
            Some(stream) if stream.raw_size() > crate::pg::gucs::stream_chats_over() => Some(Chat::Toasted(stream)),
            // SAFETY: the same datum, read whole.
            _ => unsafe { ChatText::from_polymorphic_datum(datum, false, oid) }.map(Chat::Held),
        }
    }
}

/// As ChatText: read as text (or json or varchar, as they are).
impl IntoDatum for Chat {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        match self {
            Chat::Held(text) => text.into_datum(),
            Chat::Toasted(stream) => Some(stream.pointer_datum()),
        }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }

    fn is_compatible_with(other: pg_sys::Oid) -> bool {
        ChatText::is_compatible_with(other)
    }
}

/// A chat passed as an argument (`chat_messages`, `chat_message_problems`): as `ArgText`,
/// or, a value still in its TOAST table (a column passed as it is) bigger than
/// `chat_backfill.stream_chats_over`, a stream over it (issue 26). Only in a database whose
/// text is UTF-8; in another one it is converted whole, as `ArgText` does.
pub enum ChatArg {
    Held(ArgText),
    Toasted(ToastStream),
}

impl FromDatum for ChatArg {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, oid: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        if server_takes_utf8() {
            // SAFETY: a non-null text datum, as the SQL signature says.
            if let Some(stream) = unsafe { ToastStream::of(datum.cast_mut_ptr()) } {
                if stream.raw_size() > crate::pg::gucs::stream_chats_over() {
                    return Some(ChatArg::Toasted(stream));
                }
            }
        }
        // SAFETY: the same datum, read whole.
        unsafe { ArgText::from_polymorphic_datum(datum, false, oid) }.map(ChatArg::Held)
    }
}

unsafe impl SqlTranslatable for ChatArg {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(ChatArg);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("TEXT"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("TEXT")));
}

unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for ChatArg {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the argument is a text datum, as the SQL signature says.
        unsafe { arg.unbox_arg_using_from_datum().unwrap_or_else(|| panic!("argument {index} must not be null")) }
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
