//! A streaming decoder for PostgreSQL's pglz format, as `pglz_decompress` in
//! src/common/pg_lzcompress.c reads it, so a TOASTed value can be decompressed as its
//! chunks arrive instead of after all of them are in memory.
//!
//! The format: a control byte, then up to 8 items, one per control bit, least
//! significant bit first. Bit 0: one literal byte. Bit 1: a tag of 2 or 3 bytes,
//! `b0 = OOOO LLLL`, `b1 = oooooooo`: offset `OOOO oooooooo` (1..=4095), length
//! `LLLL + 3` (3..=17), and if `LLLL` is 15, a third byte adds 0..=255 (so up to 273).
//! The copy may overlap its own output. Unused bits of the last control byte are
//! ignored; there is no end marker, the stream ends where the input does.
//!
//! What counts as corrupt follows `pglz_decompress(..., check_complete = true)`, which
//! is how TOAST calls it: offset 0 or reaching before the start of the output, a tag
//! cut off by the end of input, input left over once the raw size is reached, and a
//! final length other than the raw size. One deliberate difference: PostgreSQL
//! silently clips a last copy that runs past the raw size; this decoder calls it
//! corrupt (PostgreSQL's compressor never writes one).

use crate::error::DecodeError;
use crate::window::Window;

/// How far back a pglz tag can reach: 12 bits of offset. (PostgreSQL's compressor stops
/// looking at 4094, `thisoff >= 0x0fff` in pglz_find_match, but its decoder takes 4095,
/// and so does this one.)
pub const PGLZ_WINDOW: usize = 4095;

/// A control group's most input (the control byte and 8 tags of 3 bytes) and output (8
/// copies of 273 bytes).
const GROUP_INPUT: usize = 1 + 8 * 3;
const GROUP_OUTPUT: usize = 8 * 273;

pub struct PglzDecoder {
    window: Window,
    raw_size: u64,
    /// Control bits not yet used, least significant first, and how many are left.
    ctrl: u8,
    ctrl_left: u8,
    /// The bytes of a tag read so far (a tag split across `feed` calls).
    tag: [u8; 3],
    tag_len: u8,
    /// Set by an error or `finish`: the decoder takes no more input.
    done: bool,
}

impl PglzDecoder {
    /// A decoder for a stream that decompresses to exactly `raw_size` bytes.
    pub fn new(raw_size: u64) -> PglzDecoder {
        PglzDecoder {
            window: Window::new(PGLZ_WINDOW),
            raw_size,
            ctrl: 0,
            ctrl_left: 0,
            tag: [0; 3],
            tag_len: 0,
            done: false,
        }
    }

    /// Bytes of output so far.
    pub fn produced(&self) -> u64 {
        self.window.produced()
    }

    /// Decodes `input`, the next bytes of the stream, handing the output to `out` (in
    /// pieces of any size; all of the output `input` completes is handed over before
    /// this returns). After an error the decoder is unusable.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), DecodeError> {
        if self.done {
            return Err(DecodeError::Finished);
        }
        let result = self.feed_inner(input, out);
        // Hand over what was decoded even on error: it was correct output up to there.
        self.window.flush(out);
        if result.is_err() {
            self.done = true;
        }
        result
    }

    fn feed_inner(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), DecodeError> {
        let mut i = 0;
        while i < input.len() {
            // Most of a stream: a whole control group in the input (at most 25 bytes) and
            // room for its largest output before the raw size, decoded without the per-item
            // state and bounds of the general path below (twice as fast; the same output
            // and the same errors, which can only be a bad offset here).
            if self.tag_len == 0
                && self.ctrl_left == 0
                && input.len() - i >= GROUP_INPUT
                && self.raw_size - self.window.produced() >= GROUP_OUTPUT as u64
            {
                i = self.group(input, i, out)?;
                continue;
            }
            // pglz_decompress stops reading once the output is full; anything left in
            // the input (even a lone control byte) fails its check_complete.
            if self.tag_len == 0 && self.window.produced() == self.raw_size {
                return Err(DecodeError::TrailingInput);
            }
            if self.ctrl_left == 0 {
                self.ctrl = input[i];
                self.ctrl_left = 8;
                i += 1;
                continue;
            }
            if self.ctrl & 1 == 0 {
                // A run of literals: as many as the control bits, the input and the
                // raw size all allow, in one copy.
                let zeros = (self.ctrl.trailing_zeros() as usize).min(self.ctrl_left as usize);
                let room = (self.raw_size - self.window.produced()) as usize;
                let n = zeros.min(input.len() - i).min(room);
                self.window.push(&input[i..i + n], out);
                i += n;
                self.ctrl = if n >= 8 { 0 } else { self.ctrl >> n };
                self.ctrl_left -= n as u8;
                continue;
            }
            // A tag: collect its 2 or 3 bytes, which may arrive in separate feeds.
            self.tag[self.tag_len as usize] = input[i];
            self.tag_len += 1;
            i += 1;
            let need = if self.tag[0] & 0x0f == 0x0f { 3 } else { 2 };
            if (self.tag_len as usize) < need {
                continue;
            }
            let mut len = (self.tag[0] & 0x0f) as usize + 3;
            if need == 3 {
                len += self.tag[2] as usize;
            }
            let offset = (((self.tag[0] & 0xf0) as usize) << 4) | self.tag[1] as usize;
            self.tag_len = 0;
            self.ctrl >>= 1;
            self.ctrl_left -= 1;
            let produced = self.window.produced();
            if offset == 0 || offset as u64 > produced {
                return Err(DecodeError::BadOffset { offset, produced });
            }
            if produced + len as u64 > self.raw_size {
                return Err(DecodeError::OutputTooLong {
                    raw_size: self.raw_size,
                });
            }
            self.window.copy(offset, len, out);
        }
        Ok(())
    }

    /// Decodes the control group at `input[i..]`, which holds all of it, into room for
    /// its largest output; returns where the next one starts.
    fn group(&mut self, input: &[u8], mut i: usize, out: &mut impl FnMut(&[u8])) -> Result<usize, DecodeError> {
        let ctrl = input[i];
        i += 1;
        self.window.reserve(GROUP_OUTPUT, out);
        for bit in 0..8 {
            if ctrl >> bit & 1 == 0 {
                self.window.push_byte(input[i]);
                i += 1;
                continue;
            }
            let (b0, b1) = (input[i], input[i + 1]);
            i += 2;
            let mut len = (b0 & 0x0f) as usize + 3;
            if len == 18 {
                len += input[i] as usize;
                i += 1;
            }
            let offset = (((b0 & 0xf0) as usize) << 4) | b1 as usize;
            let produced = self.window.produced();
            if offset == 0 || offset as u64 > produced {
                return Err(DecodeError::BadOffset { offset, produced });
            }
            self.window.copy_reserved(offset, len);
        }
        Ok(i)
    }

    /// Ends the stream: the input must have ended after a whole item (not inside a
    /// tag) and the output must be exactly the raw size. Returns the output length.
    pub fn finish(&mut self, out: &mut impl FnMut(&[u8])) -> Result<u64, DecodeError> {
        if self.done {
            return Err(DecodeError::Finished);
        }
        self.done = true;
        self.window.end(self.raw_size, self.tag_len == 0, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(raw_size: u64, input: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut got = Vec::new();
        let mut d = PglzDecoder::new(raw_size);
        let mut sink = |b: &[u8]| got.extend_from_slice(b);
        d.feed(input, &mut sink)?;
        d.finish(&mut sink)?;
        Ok(got)
    }

    #[test]
    fn literals_and_an_overlapping_tag() {
        // ctrl 0b0010: literal 'a', tag offset 1 length 3+2=5, then 'b'.
        let input = [0b0000_0010, b'a', 0x02, 0x01, b'b'];
        assert_eq!(decode(7, &input).unwrap(), b"aaaaaab");
    }

    #[test]
    fn extended_length_and_max_offset() {
        // 4095 literal bytes, then a tag copying from 4095 back, length 18 + 255.
        let mut input = Vec::new();
        let mut expect = Vec::new();
        for i in 0..4095usize {
            if i % 8 == 0 {
                input.push(0);
            }
            let b = (i * 7 % 256) as u8;
            input.push(b);
            expect.push(b);
        }
        // 4095 = 511 * 8 + 7: the last control byte has one bit left, for the tag.
        let last_ctrl = input.len() - 8;
        input[last_ctrl] = 0b1000_0000;
        input.extend_from_slice(&[0xff, 0xff, 255]);
        for k in 0..273 {
            expect.push(expect[k]);
        }
        assert_eq!(decode(expect.len() as u64, &input).unwrap(), expect);
    }

    #[test]
    fn corrupt_inputs_are_errors() {
        // Offset 0.
        assert!(matches!(
            decode(4, &[0b10, b'a', 0x00, 0x00]),
            Err(DecodeError::BadOffset { offset: 0, .. })
        ));
        // Offset past the start of the output.
        assert!(matches!(
            decode(4, &[0b10, b'a', 0x00, 0x02]),
            Err(DecodeError::BadOffset { offset: 2, .. })
        ));
        // Longer than declared.
        assert!(matches!(
            decode(3, &[0b10, b'a', 0x00, 0x01]),
            Err(DecodeError::OutputTooLong { .. })
        ));
        // Tag cut off, inside the length extension.
        assert_eq!(
            decode(100, &[0b10, b'a', 0x0f, 0x01]),
            Err(DecodeError::Truncated)
        );
        // Shorter than declared.
        assert!(matches!(
            decode(5, &[0, b'a']),
            Err(DecodeError::OutputTooShort { .. })
        ));
        // Input after the raw size is reached, even a lone control byte.
        assert_eq!(decode(1, &[0, b'a', b'b']), Err(DecodeError::TrailingInput));
        assert_eq!(
            decode(8, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 0]),
            Err(DecodeError::TrailingInput)
        );
        // Empty stream for an empty value is fine; a lone control byte is not.
        assert_eq!(decode(0, &[]).unwrap(), b"");
        assert_eq!(decode(0, &[0]), Err(DecodeError::TrailingInput));
    }

    #[test]
    fn no_input_after_an_error() {
        let mut d = PglzDecoder::new(10);
        let mut sink = |_: &[u8]| {};
        assert!(d.feed(&[0b10, b'a', 0, 0], &mut sink).is_err());
        assert_eq!(d.feed(&[0], &mut sink), Err(DecodeError::Finished));
        assert_eq!(d.finish(&mut sink), Err(DecodeError::Finished));
    }
}
