//! The one error type every decoder returns. Corrupt or truncated input is an ordinary
//! outcome for a reader of on-disk data (a damaged TOAST table, a caller that stopped
//! feeding early), so it is a value the caller can report, never a panic.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A copy reaches back before the first byte of output (or has offset 0).
    BadOffset { offset: usize, produced: u64 },
    /// The stream would produce more bytes than the declared raw size.
    OutputTooLong { raw_size: u64 },
    /// Input continues after the stream already produced the declared raw size.
    TrailingInput,
    /// The input ended inside a control byte's item, a tag, a token or a length.
    Truncated,
    /// The input ended on a boundary but produced fewer bytes than declared.
    OutputTooShort { raw_size: u64, produced: u64 },
    /// The `va_tcinfo` method bits name no method this crate knows (2 or 3).
    UnknownMethod(u8),
    /// An lz4 block breaks the format's end-of-block rules: a match starting in the last
    /// 12 bytes of the block or ending in the last 5, or an empty block other than 0x00.
    Lz4EndOfBlock,
    /// `feed` was called after `finish`, or after an earlier error.
    Finished,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadOffset { offset, produced } => write!(
                f,
                "compressed data is corrupt: copy offset {offset} with {produced} bytes of output so far"
            ),
            DecodeError::OutputTooLong { raw_size } => write!(
                f,
                "compressed data is corrupt: it decompresses to more than the declared {raw_size} bytes"
            ),
            DecodeError::TrailingInput => write!(
                f,
                "compressed data is corrupt: input continues after the declared raw size was reached"
            ),
            DecodeError::Truncated => {
                write!(f, "compressed data is truncated: input ended inside a sequence")
            }
            DecodeError::OutputTooShort { raw_size, produced } => write!(
                f,
                "compressed data is corrupt: it decompresses to {produced} bytes, {raw_size} declared"
            ),
            DecodeError::UnknownMethod(m) => write!(f, "unknown TOAST compression method id {m}"),
            DecodeError::Lz4EndOfBlock => write!(
                f,
                "compressed lz4 data is corrupt: it breaks the format's end-of-block rules"
            ),
            DecodeError::Finished => write!(f, "decoder already finished or failed"),
        }
    }
}

impl std::error::Error for DecodeError {}
