//! The `va_tcinfo` word: the first 4 bytes of a compressed varlena's data, and so the
//! first 4 bytes of the first TOAST chunk of an external compressed value (toast_save_datum
//! stores `VARDATA` of the compressed datum, which begins with it). PostgreSQL 14+
//! (varatt.h / postgres.h): the lower 30 bits are the raw (decompressed) size, the upper
//! 2 bits the method, `TOAST_PGLZ_COMPRESSION_ID` 0 and `TOAST_LZ4_COMPRESSION_ID` 1.
//! Before 14 the upper bits were always 0, which reads as pglz, which is what it was.

use crate::error::DecodeError;

/// Bytes of `va_tcinfo` before the compressed stream starts.
pub const TCINFO_LEN: usize = 4;

/// `VARLENA_EXTSIZE_BITS`.
const EXTSIZE_BITS: u32 = 30;
const EXTSIZE_MASK: u32 = (1 << EXTSIZE_BITS) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionMethod {
    Pglz,
    Lz4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcInfo {
    /// Decompressed size in bytes (`VARDATA_COMPRESSED_GET_EXTSIZE`).
    pub raw_size: u32,
    pub method: CompressionMethod,
}

impl TcInfo {
    /// Parses the word as stored on disk. PostgreSQL writes it as a native-endian uint32
    /// (data files are not portable across byte orders anyway), so this reads it in the
    /// byte order of the machine this runs on, which is the server's.
    pub fn parse(bytes: [u8; TCINFO_LEN]) -> Result<TcInfo, DecodeError> {
        let word = u32::from_ne_bytes(bytes);
        let method = match word >> EXTSIZE_BITS {
            0 => CompressionMethod::Pglz,
            1 => CompressionMethod::Lz4,
            // 2 is TOAST_INVALID_COMPRESSION_ID; 3 is unassigned.
            m => return Err(DecodeError::UnknownMethod(m as u8)),
        };
        Ok(TcInfo {
            raw_size: word & EXTSIZE_MASK,
            method,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_sizes() {
        let pglz = TcInfo::parse(123_456u32.to_ne_bytes()).unwrap();
        assert_eq!(pglz.raw_size, 123_456);
        assert_eq!(pglz.method, CompressionMethod::Pglz);
        let lz4 = TcInfo::parse(((1u32 << 30) | EXTSIZE_MASK).to_ne_bytes()).unwrap();
        assert_eq!(lz4.raw_size, EXTSIZE_MASK);
        assert_eq!(lz4.method, CompressionMethod::Lz4);
        assert_eq!(
            TcInfo::parse(((2u32 << 30) | 5).to_ne_bytes()),
            Err(DecodeError::UnknownMethod(2))
        );
        assert_eq!(
            TcInfo::parse((3u32 << 30).to_ne_bytes()),
            Err(DecodeError::UnknownMethod(3))
        );
    }
}
