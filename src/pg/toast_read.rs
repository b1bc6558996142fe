//! Reading a chat stored in a TOAST table a slice at a time (issue 26): the stored bytes
//! come through the table AM's own `relation_fetch_toast_slice` (the index, the TOAST
//! snapshot and the chunk checks are PostgreSQL's), a megabyte at a time, and a compressed
//! value is decompressed as it streams (`chat_backfill_toast_stream`: pglz or lz4, with
//! their history windows only). Detoasting holds the whole document, and the compressed
//! copy while it decompresses: memory grew with the largest chat.

use std::panic::AssertUnwindSafe;

use chat_backfill_toast_stream::ToastDecoder;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED;

use crate::pg::error::{Error, Result};
use crate::pg::subxact::in_subtransaction_catching;

/// Stored bytes fetched at a time: a few hundred chunks, one index descent for each.
const SLICE_BYTES: usize = 1 << 20;
/// Stored bytes decompressed at a time: what one step can hand out is bounded by this
/// times the format's best ratio (lz4 about 255, pglz 91), 4 MB, not by a whole fetch
/// (a reviewer's megabyte of lz4 padding decompressed to 255 MB in one step).
const FEED_BYTES: usize = 16 << 10;

/// A value in a TOAST table, read from its start.
pub struct ToastStream {
    pointer: pg_sys::varatt_external,
    /// Bytes as stored (compressed or not), and read so far.
    stored: usize,
    offset: usize,
    /// `None`: stored uncompressed.
    decoder: Option<ToastDecoder>,
    raw: usize,
    /// Stored bytes fetched and not yet decompressed, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
}

impl ToastStream {
    /// A stream over `value` if it lies in a TOAST table; `None` for a value held in the
    /// row (at most about 2 kB, or compressed to that), which is read whole.
    ///
    /// # Safety
    /// `value` points at a live varlena (a datum of a text-like type, as fetched).
    pub unsafe fn of(value: *const pg_sys::varlena) -> Option<ToastStream> {
        // SAFETY: the caller's varlena; an external one's tag says which pointer follows.
        let on_disk = unsafe {
            pgrx::varlena::varatt_is_1b_e(value)
                && u32::from(pgrx::varlena::vartag_1b_e(value)) == pg_sys::vartag_external::VARTAG_ONDISK
        };
        if !on_disk {
            return None;
        }
        // SAFETY: an on-disk TOAST pointer follows the 2-byte external header, unaligned
        // (VARATT_EXTERNAL_GET_POINTER copies it out the same way).
        let pointer = unsafe {
            std::ptr::read_unaligned(value.cast::<u8>().add(2).cast::<pg_sys::varatt_external>())
        };
        let stored = (pointer.va_extinfo & pg_sys::VARLENA_EXTSIZE_MASK) as usize;
        let raw = (pointer.va_rawsize as usize).saturating_sub(pg_sys::VARHDRSZ);
        // VARATT_EXTERNAL_IS_COMPRESSED: stored smaller than the text.
        let decoder = (stored < raw).then(ToastDecoder::new);
        Some(ToastStream { pointer, stored, offset: 0, decoder, raw, pending: Vec::new(), pending_at: 0 })
    }

    /// Whether `other` points at the same stored value.
    pub fn same_value(&self, other: &ToastStream) -> bool {
        (self.pointer.va_valueid, self.pointer.va_toastrelid) == (other.pointer.va_valueid, other.pointer.va_toastrelid)
    }

    /// A datum that points at the value again (a TOAST pointer, as the row holds it), in
    /// the current memory context.
    pub fn pointer_datum(&self) -> pg_sys::Datum {
        let size = 2 + std::mem::size_of::<pg_sys::varatt_external>();
        // SAFETY: a new palloc'd varlena of an on-disk TOAST pointer's size: the 1-byte
        // external header (0x01, then the tag), then the pointer, unaligned, as the row holds it.
        unsafe {
            let bytes = pg_sys::palloc(size).cast::<u8>();
            *bytes = 0x01;
            *bytes.add(1) = pg_sys::vartag_external::VARTAG_ONDISK as u8;
            std::ptr::write_unaligned(bytes.add(2).cast::<pg_sys::varatt_external>(), self.pointer);
            pg_sys::Datum::from(bytes)
        }
    }

    /// The document's size, decompressed.
    pub fn raw_size(&self) -> usize {
        self.raw
    }

    /// Hands the next slice of the document's text to `out`, in pieces; `false` once the
    /// whole document has been given. For a value read in the transaction that fetched its
    /// row (whose snapshot keeps it), where a missing chunk is corruption.
    pub fn next_slice(&mut self, out: &mut impl FnMut(&[u8])) -> Result<bool> {
        match self.next_slice_unless_gone(out)? {
            Some(more) => Ok(more),
            None => Err(self.corrupted(&"chunks are missing")),
        }
    }

    /// The same, `None` when the value's chunks are gone: read on in a later transaction
    /// (the committing form goes on with a chat after a COMMIT), the row may have been
    /// updated or deleted, and vacuumed, in between, or the table rewritten.
    pub fn next_slice_unless_gone(&mut self, out: &mut impl FnMut(&[u8])) -> Result<Option<bool>> {
        if self.pending_at >= self.pending.len() {
            if self.offset >= self.stored {
                return Ok(Some(false));
            }
            check_for_interrupts!();
            let length = SLICE_BYTES.min(self.stored - self.offset);
            let Some(slice) = self.fetch(length)? else { return Ok(None) };
            self.offset += length;
            self.pending = slice;
            self.pending_at = 0;
        }
        let range = self.pending_at..self.pending.len().min(self.pending_at + FEED_BYTES);
        self.pending_at = range.end;
        let last = self.offset >= self.stored && self.pending_at >= self.pending.len();
        let piece = &self.pending[range];
        let decoded = match &mut self.decoder {
            None => {
                out(piece);
                Ok(())
            }
            Some(decoder) => decoder.feed(piece, out).and_then(|()| if last { decoder.finish(out).map(drop) } else { Ok(()) }),
        };
        decoded.map_err(|e| self.corrupted(&e))?;
        Ok(Some(!last))
    }

    /// `length` stored bytes from the current offset, copied out of PostgreSQL's memory;
    /// `None` when a chunk is missing (PostgreSQL's XX001 "missing chunk number"), in a
    /// subtransaction so that the caller can go on.
    fn fetch(&self, length: usize) -> Result<Option<Vec<u8>>> {
        let (pointer, stored, offset) = (self.pointer, self.stored, self.offset);
        let fetched = in_subtransaction_catching(
            AssertUnwindSafe(|| {
                // SAFETY: the TOAST table the pointer names, opened and closed here under
                // AccessShareLock as detoasting does; the result buffer is palloc'd at the size
                // relation_fetch_toast_slice writes (VARHDRSZ plus the slice) and freed after
                // the copy. An ERROR inside (a dropped table, a missing chunk) unwinds with the
                // relation and the buffer released by the subtransaction's abort.
                unsafe {
                    // Gone with its table (the source rewritten since the value was read): as
                    // gone as a missing chunk.
                    let rel = pg_sys::try_table_open(pointer.va_toastrelid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                    if rel.is_null() {
                        return None;
                    }
                    let result = pg_sys::palloc(length + pg_sys::VARHDRSZ).cast::<pg_sys::varlena>();
                    pgrx::varlena::set_varsize_4b(result, (length + pg_sys::VARHDRSZ) as i32);
                    pg_sys::table_relation_fetch_toast_slice(
                        rel,
                        pointer.va_valueid,
                        stored as i32,
                        offset as i32,
                        length as i32,
                        result,
                    );
                    pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                    let bytes = std::slice::from_raw_parts(pgrx::varlena::vardata_4b(result).cast::<u8>(), length).to_vec();
                    pg_sys::pfree(result.cast());
                    Some(bytes)
                }
            }),
            |sqlstate| sqlstate == "XX001",
        );
        Ok(fetched.ok().flatten())
    }

    /// The same value, to be read again from its start.
    pub fn restart(&mut self) -> &mut ToastStream {
        self.offset = 0;
        self.pending = Vec::new();
        self.pending_at = 0;
        if self.decoder.is_some() {
            self.decoder = Some(ToastDecoder::new());
        }
        self
    }

    pub fn corrupted(&self, error: &dyn std::fmt::Display) -> Error {
        Error::new(
            ERRCODE_DATA_CORRUPTED,
            format!(
                "the TOASTed value {} in TOAST table {} does not decompress: {error}",
                self.pointer.va_valueid.to_u32(),
                self.pointer.va_toastrelid.to_u32()
            ),
            "PostgreSQL's own detoasting of this value fails too, or this is a bug: report it with the value's \
             pg_column_compression() and pg_column_size().",
        )
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::ToastStream;

    /// Every stored form of a chat column: compressed with pglz and with lz4 in the TOAST
    /// table, uncompressed there (EXTERNAL storage), and held in the row.
    #[pg_test]
    fn every_stored_form_streams_to_the_detoasted_text() {
        Spi::run(
            "CREATE TABLE forms (form text, chat json); \
             ALTER TABLE forms ALTER COLUMN chat SET STORAGE EXTERNAL; \
             CREATE TABLE pglz (LIKE forms); ALTER TABLE pglz ALTER COLUMN chat SET COMPRESSION pglz; \
             CREATE TABLE lz4 (LIKE forms); ALTER TABLE lz4 ALTER COLUMN chat SET COMPRESSION lz4",
        )
        .unwrap();
        // Text that compresses (repeats) and text that does not (md5s), 3 MB and more,
        // so that a value spans several slices; and a small one, held in the row.
        let doc = "(SELECT json_build_object('history', json_build_object('messages', json_object_agg('m' || i, \
                   json_build_object('content', repeat('abc ', i % 50) || md5(i::text))))) FROM generate_series(1, 60000) i)";
        for table in ["forms", "pglz", "lz4"] {
            Spi::run(&format!("INSERT INTO {table} VALUES ('{table}', {doc}), ('{table} small', '{{\"a\":1}}')")).unwrap();
        }
        let checked = Spi::connect(|client| {
            let mut checked = Vec::new();
            for table in ["forms", "pglz", "lz4"] {
                let mut rows =
                    client.select(&format!("SELECT form, chat, pg_column_compression(chat) FROM {table}"), None, &[]).unwrap();
                while rows.next().is_some() {
                    let form: String = rows.get(1).unwrap().unwrap();
                    let compression: Option<String> = rows.get(3).unwrap();
                    let datum = rows.get_datum_by_ordinal(2).unwrap().unwrap();
                    // SAFETY: a non-null json datum of the row just fetched.
                    let Some(mut stream) = (unsafe { ToastStream::of(datum.cast_mut_ptr()) }) else {
                        checked.push((form, None, compression));
                        continue;
                    };
                    let mut text = Vec::new();
                    let mut slices = 0;
                    while stream.next_slice(&mut |piece| text.extend_from_slice(piece)).unwrap() {
                        slices += 1;
                    }
                    assert_eq!(text.len(), stream.raw_size());
                    let whole: String = client
                        .select(&format!("SELECT chat::text FROM {table} WHERE form = $1"), None, &[form.clone().into()])
                        .unwrap()
                        .first()
                        .get(1)
                        .unwrap()
                        .unwrap();
                    assert!(text == whole.as_bytes(), "{form}: the streamed text differs");
                    checked.push((form, Some(slices + 1), compression));
                }
            }
            checked
        });
        let forms: Vec<(&str, bool, Option<&str>)> =
            checked.iter().map(|(f, s, c)| (f.as_str(), s.is_some_and(|s| s > 1), c.as_deref())).collect();
        assert_eq!(
            forms,
            vec![
                ("forms", true, None),
                ("forms small", false, None),
                ("pglz", true, Some("pglz")),
                ("pglz small", false, None),
                ("lz4", true, Some("lz4")),
                ("lz4 small", false, None),
            ]
        );
    }
}
