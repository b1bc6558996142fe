//! Streaming decompressors for the two compression formats PostgreSQL stores TOASTed
//! values in, so a backend can read a large compressed value chunk by chunk from its
//! TOAST table and decompress it as it goes: memory is bounded by the formats' history
//! windows, not by the document's size. No PostgreSQL here (this crate does not depend
//! on pgrx), so `cargo test -p chat_backfill_toast_stream` needs no server.
//!
//! - `header`: the 4-byte `va_tcinfo` word a compressed value's data starts with (raw
//!   size and method).
//! - `pglz`: PostgreSQL's own LZ format (`src/common/pg_lzcompress.c`).
//! - `lz4`: the LZ4 block format (what `LZ4_compress_default` writes; no frame).
//! - `toast`: header + dispatch, for feeding the concatenated chunk bytes of an
//!   external compressed value.
//! - `window`: the bounded output history both decoders copy matches from.
//! - `error`: the one error type.
//!
//! Every decoder takes input in slices of any size (down to one byte, split anywhere,
//! including inside a tag or a length extension) and hands decoded bytes to a sink
//! closure as soon as it has them. Corrupt input is an error, never a panic.

#![forbid(unsafe_code)]

pub mod error;
pub mod header;
pub mod lz4;
pub mod pglz;
pub mod toast;
mod window;

pub use error::DecodeError;
pub use header::{CompressionMethod, TcInfo, TCINFO_LEN};
pub use lz4::Lz4Decoder;
pub use pglz::PglzDecoder;
pub use toast::ToastDecoder;
