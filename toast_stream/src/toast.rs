//! A decoder for the data of a compressed TOAST value as its chunks store it: the
//! 4-byte `va_tcinfo` word, then the pglz or lz4 stream. The caller feeds the chunks'
//! `chunk_data` in `chunk_seq` order, and need not know the method up front: it is in
//! the first 4 bytes, which may themselves arrive split.

use crate::error::DecodeError;
use crate::header::{CompressionMethod, TcInfo, TCINFO_LEN};
use crate::lz4::Lz4Decoder;
use crate::pglz::PglzDecoder;

enum Inner {
    /// Still reading `va_tcinfo`.
    Header {
        bytes: [u8; TCINFO_LEN],
        len: usize,
    },
    Pglz(PglzDecoder),
    Lz4(Lz4Decoder),
}

pub struct ToastDecoder {
    inner: Inner,
    tcinfo: Option<TcInfo>,
}

impl Default for ToastDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ToastDecoder {
    pub fn new() -> ToastDecoder {
        ToastDecoder {
            inner: Inner::Header {
                bytes: [0; TCINFO_LEN],
                len: 0,
            },
            tcinfo: None,
        }
    }

    /// The parsed `va_tcinfo`, once its 4 bytes have been fed.
    pub fn tcinfo(&self) -> Option<TcInfo> {
        self.tcinfo
    }

    /// Decodes the next bytes of the value's data, handing output to `out`.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut impl FnMut(&[u8]),
    ) -> Result<(), DecodeError> {
        if let Inner::Header { bytes, len } = &mut self.inner {
            let n = (TCINFO_LEN - *len).min(input.len());
            bytes[*len..*len + n].copy_from_slice(&input[..n]);
            *len += n;
            input = &input[n..];
            if *len < TCINFO_LEN {
                return Ok(());
            }
            let info = TcInfo::parse(*bytes)?;
            self.tcinfo = Some(info);
            let raw_size = info.raw_size as u64;
            self.inner = match info.method {
                CompressionMethod::Pglz => Inner::Pglz(PglzDecoder::new(raw_size)),
                CompressionMethod::Lz4 => Inner::Lz4(Lz4Decoder::new(raw_size)),
            };
        }
        match &mut self.inner {
            Inner::Header { .. } => unreachable!("header was completed above"),
            Inner::Pglz(d) => d.feed(input, out),
            Inner::Lz4(d) => d.feed(input, out),
        }
    }

    /// Ends the value: checks it was complete. Returns the output length.
    pub fn finish(&mut self, out: &mut impl FnMut(&[u8])) -> Result<u64, DecodeError> {
        match &mut self.inner {
            Inner::Header { .. } => Err(DecodeError::Truncated),
            Inner::Pglz(d) => d.finish(out),
            Inner::Lz4(d) => d.finish(out),
        }
    }
}
