//! Test-only reference compressors for the two formats, and a helper that feeds a
//! decoder in given slice sizes. The compressors are simple greedy encoders, written to
//! exercise what the decoders must handle rather than to compress well: each match
//! search also tries the farthest offset the format allows and offset 1, so runs become
//! overlapping copies, data that repeats at the window size becomes max-offset copies,
//! and long repeats become max-length (pglz) or length-extended (lz4) copies.

#![allow(dead_code)] // each test binary uses a different part

use chat_backfill_toast_stream::{DecodeError, Lz4Decoder, PglzDecoder, ToastDecoder};

/// Length of the common prefix of `data[a..]` and `data[b..]`, at most `max`.
fn common(data: &[u8], a: usize, b: usize, max: usize) -> usize {
    let mut n = 0;
    while n < max && b + n < data.len() && data[a + n] == data[b + n] {
        n += 1;
    }
    n
}

/// The best of a few candidate match positions for `pos`: the last position with the
/// same `key_len`-byte hash, `pos - max_offset`, and `pos - 1`.
fn best_match(
    data: &[u8],
    pos: usize,
    table: &[usize],
    hash: usize,
    max_offset: usize,
    max_len: usize,
) -> (usize, usize) {
    let mut best = (0, 0); // (offset, len)
    let mut candidates = [usize::MAX; 3];
    if table[hash] != usize::MAX && pos - table[hash] <= max_offset {
        candidates[0] = table[hash];
    }
    if pos >= max_offset {
        candidates[1] = pos - max_offset;
    }
    if pos >= 1 {
        candidates[2] = pos - 1;
    }
    for c in candidates {
        if c == usize::MAX {
            continue;
        }
        let len = common(data, c, pos, max_len);
        if len > best.1 {
            best = (pos - c, len);
        }
    }
    best
}

fn hash(bytes: &[u8], bits: u32) -> usize {
    let mut v = 0u32;
    for &b in bytes {
        v = (v << 8) | b as u32;
    }
    (v.wrapping_mul(2_654_435_761) >> (32 - bits)) as usize
}

/// pglz: control bytes of 8 items, literal bytes, tags of offset 1..=4095 and length
/// 3..=273. Matches may run to the very end (pglz has no end-of-stream rule).
pub fn pglz_compress(data: &[u8]) -> Vec<u8> {
    const BITS: u32 = 12;
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 1);
    let mut table = vec![usize::MAX; 1 << BITS];
    let mut ctrl_at = 0;
    let mut ctrl_bit = 8;
    let mut pos = 0;
    while pos < data.len() {
        if ctrl_bit == 8 {
            ctrl_at = out.len();
            out.push(0);
            ctrl_bit = 0;
        }
        let (offset, len) = if pos + 3 <= data.len() {
            let h = hash(&data[pos..pos + 3], BITS);
            let m = best_match(data, pos, &table, h, 4095, 273);
            table[h] = pos;
            m
        } else {
            (0, 0)
        };
        if len >= 3 {
            out[ctrl_at] |= 1 << ctrl_bit;
            let hi = ((offset >> 4) & 0xf0) as u8;
            if len < 18 {
                out.push(hi | (len - 3) as u8);
                out.push(offset as u8);
            } else {
                out.push(hi | 0x0f);
                out.push(offset as u8);
                out.push((len - 18) as u8);
            }
            pos += len;
        } else {
            out.push(data[pos]);
            pos += 1;
        }
        ctrl_bit += 1;
    }
    out
}

/// lz4 block: greedy, 4-byte minimum match, offsets up to 65535, and the format's
/// end-of-block rules (the last 5 bytes are literals; no match starts in the last 12), so
/// the reference decoder (lz4_flex's) accepts the output too.
pub fn lz4_compress(data: &[u8]) -> Vec<u8> {
    const BITS: u32 = 16;
    const MFLIMIT: usize = 12;
    const LASTLITERALS: usize = 5;
    let mut out = Vec::with_capacity(data.len() + data.len() / 255 + 16);
    let mut table = vec![usize::MAX; 1 << BITS];
    let mut anchor = 0; // start of pending literals
    let mut pos = 0;
    let match_limit = data.len().saturating_sub(MFLIMIT);
    while pos < match_limit {
        let h = hash(&data[pos..pos + 4], BITS);
        let max_len = data.len() - LASTLITERALS - pos;
        let (offset, len) = best_match(data, pos, &table, h, 65535, max_len);
        table[h] = pos;
        if len < 4 {
            pos += 1;
            continue;
        }
        emit_sequence(&mut out, &data[anchor..pos], Some((offset, len)));
        pos += len;
        anchor = pos;
    }
    emit_sequence(&mut out, &data[anchor..], None);
    out
}

fn push_len_ext(out: &mut Vec<u8>, mut rest: usize) {
    while rest >= 255 {
        out.push(255);
        rest -= 255;
    }
    out.push(rest as u8);
}

fn emit_sequence(out: &mut Vec<u8>, literals: &[u8], m: Option<(usize, usize)>) {
    let lit_nibble = literals.len().min(15);
    let match_nibble = m.map_or(0, |(_, len)| (len - 4).min(15));
    out.push(((lit_nibble << 4) | match_nibble) as u8);
    if literals.len() >= 15 {
        push_len_ext(out, literals.len() - 15);
    }
    out.extend_from_slice(literals);
    if let Some((offset, len)) = m {
        out.extend_from_slice(&(offset as u16).to_le_bytes());
        if len - 4 >= 15 {
            push_len_ext(out, len - 4 - 15);
        }
    }
}

/// The three decoders' `feed`/`finish`, behind one interface for the helpers below.
pub trait Stream {
    fn feed_dyn(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) -> Result<(), DecodeError>;
    fn finish_dyn(&mut self, out: &mut dyn FnMut(&[u8])) -> Result<u64, DecodeError>;
}

macro_rules! stream_impl {
    ($t:ty) => {
        impl Stream for $t {
            fn feed_dyn(
                &mut self,
                input: &[u8],
                mut out: &mut dyn FnMut(&[u8]),
            ) -> Result<(), DecodeError> {
                self.feed(input, &mut out)
            }
            fn finish_dyn(&mut self, mut out: &mut dyn FnMut(&[u8])) -> Result<u64, DecodeError> {
                self.finish(&mut out)
            }
        }
    };
}
stream_impl!(PglzDecoder);
stream_impl!(Lz4Decoder);
stream_impl!(ToastDecoder);

/// Feeds `input` to `decoder` in slices of the given sizes (cycled; 0 reads as 1), then
/// finishes it; returns the output.
pub fn feed_in_slices(
    decoder: &mut impl Stream,
    input: &[u8],
    sizes: &[usize],
) -> Result<Vec<u8>, DecodeError> {
    let mut got = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    while pos < input.len() {
        let size = if sizes.is_empty() {
            1
        } else {
            sizes[k % sizes.len()].max(1)
        };
        let end = (pos + size).min(input.len());
        decoder.feed_dyn(&input[pos..end], &mut |b| got.extend_from_slice(b))?;
        pos = end;
        k += 1;
    }
    decoder.finish_dyn(&mut |b| got.extend_from_slice(b))?;
    Ok(got)
}
