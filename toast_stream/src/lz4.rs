//! A streaming decoder for the LZ4 block format, which is what PostgreSQL stores for
//! `COMPRESSION lz4` (the output of `LZ4_compress_default`, no frame, no checksum), so
//! a TOASTed value can be decompressed as its chunks arrive.
//!
//! The format: a sequence of (token, literals, match). The token's high nibble is the
//! literal count, its low nibble the match length minus 4; a nibble of 15 is followed by
//! extension bytes that each add 0..=255, continuing while a byte is 255. Then the
//! literals, a 2-byte little-endian offset (1..=65535), and the match-length extension.
//! The block ends after the literals of a sequence: the last sequence has no offset
//! and no match, and the only way to know it is last is that the input ends there.
//!
//! What counts as corrupt: a copy reaching before the start of the output (or offset
//! 0, which the format calls invalid), output longer than the raw size, input ending
//! anywhere but right after a sequence's literals, a final length short of the raw size,
//! and a block that breaks the format's end-of-block rules: the last match must start at
//! least 12 bytes before the end of the block and the last 5 bytes must be literals
//! (so an empty block is the one byte 0x00). Every encoder follows those rules,
//! `LZ4_compress_default` included, so no value PostgreSQL wrote breaks them; checking
//! them makes this decoder accept nothing PostgreSQL's decoder (liblz4's
//! `LZ4_decompress_safe`, given the raw size as the output capacity) would reject.
//! liblz4 checks them only on its careful paths: its fast shortcut for short sequences
//! skips them, so it accepts some blocks that break them, and this decoder does not.
//! Likewise liblz4 copies from the byte it is writing for offset 0, and PostgreSQL
//! accepts an output shorter than the raw size; both are errors here.

use crate::error::DecodeError;
use crate::window::Window;

/// How far back an lz4 match can reach (the offset is 16 bits).
pub const LZ4_WINDOW: usize = 65535;

const MIN_MATCH: usize = 4;
/// `LASTLITERALS`: a match may not end in the last 5 bytes of the block.
const LAST_LITERALS: u64 = 5;
/// `MFLIMIT`: a match may not start in the last 12 bytes of the block, so literals that
/// end there must be the last sequence's.
const MF_LIMIT: u64 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a token.
    Token,
    /// Reading literal-length extension bytes.
    LiteralLen { literals: usize, match_nibble: u8 },
    /// Copying `left` more literal bytes.
    Literals { left: usize, match_nibble: u8 },
    /// After a sequence's literals: the end of the block, or the first offset byte.
    Offset { match_nibble: u8 },
    /// Have the low offset byte, expecting the high one.
    OffsetHigh { low: u8, match_nibble: u8 },
    /// Reading match-length extension bytes.
    MatchLen { offset: usize, len: usize },
}

pub struct Lz4Decoder {
    window: Window,
    raw_size: u64,
    state: State,
    done: bool,
}

impl Lz4Decoder {
    /// A decoder for a block that decompresses to exactly `raw_size` bytes.
    pub fn new(raw_size: u64) -> Lz4Decoder {
        Lz4Decoder {
            window: Window::new(LZ4_WINDOW),
            raw_size,
            state: State::Token,
            done: false,
        }
    }

    /// Bytes of output so far.
    pub fn produced(&self) -> u64 {
        self.window.produced()
    }

    /// Decodes `input`, the next bytes of the block, handing the output to `out` (in
    /// pieces of any size; all of the output `input` completes is handed over before
    /// this returns). After an error the decoder is unusable.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), DecodeError> {
        if self.done {
            return Err(DecodeError::Finished);
        }
        let result = self.feed_inner(input, out);
        self.window.flush(out);
        if result.is_err() {
            self.done = true;
        }
        result
    }

    /// Fails if `more` bytes of output would pass the raw size. Checked as lengths are
    /// read, so a corrupt run of 255s errors early instead of counting towards overflow.
    fn check_room(&self, more: usize) -> Result<(), DecodeError> {
        if self.window.produced() + more as u64 > self.raw_size {
            return Err(DecodeError::OutputTooLong {
                raw_size: self.raw_size,
            });
        }
        Ok(())
    }

    /// Fails if a match of `len` would end in the last `LAST_LITERALS` bytes.
    fn check_match_end(&self, len: usize) -> Result<(), DecodeError> {
        if self.window.produced() + len as u64 + LAST_LITERALS > self.raw_size {
            if self.window.produced() + len as u64 > self.raw_size {
                return Err(DecodeError::OutputTooLong {
                    raw_size: self.raw_size,
                });
            }
            return Err(DecodeError::Lz4EndOfBlock);
        }
        Ok(())
    }

    fn feed_inner(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), DecodeError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Token => {
                    let token = input[i];
                    i += 1;
                    // An empty block is the one byte 0x00: the end rules leave no room
                    // for a match, and liblz4 checks the byte (elsewhere it ignores a
                    // last sequence's match nibble, as this decoder does).
                    if self.raw_size == 0 && token != 0 {
                        return Err(DecodeError::Lz4EndOfBlock);
                    }
                    let literals = (token >> 4) as usize;
                    let match_nibble = token & 0x0f;
                    self.state = if literals == 15 {
                        State::LiteralLen {
                            literals,
                            match_nibble,
                        }
                    } else if literals == 0 {
                        // No literals: straight to where the block may end.
                        State::Offset { match_nibble }
                    } else {
                        self.check_room(literals)?;
                        State::Literals {
                            left: literals,
                            match_nibble,
                        }
                    };
                }
                State::LiteralLen {
                    literals,
                    match_nibble,
                } => {
                    let b = input[i];
                    i += 1;
                    let literals = literals + b as usize;
                    self.check_room(literals)?;
                    self.state = if b == 255 {
                        State::LiteralLen {
                            literals,
                            match_nibble,
                        }
                    } else {
                        State::Literals {
                            left: literals,
                            match_nibble,
                        }
                    };
                }
                State::Literals { left, match_nibble } => {
                    let n = left.min(input.len() - i);
                    self.window.push(&input[i..i + n], out);
                    i += n;
                    self.state = if n == left {
                        State::Offset { match_nibble }
                    } else {
                        State::Literals {
                            left: left - n,
                            match_nibble,
                        }
                    };
                }
                State::Offset { match_nibble } => {
                    // Input after the literals: this was not the last sequence, so a
                    // match starts here, which must be 12 bytes before the end.
                    if self.window.produced() + MF_LIMIT > self.raw_size {
                        return Err(DecodeError::Lz4EndOfBlock);
                    }
                    self.state = State::OffsetHigh {
                        low: input[i],
                        match_nibble,
                    };
                    i += 1;
                }
                State::OffsetHigh { low, match_nibble } => {
                    let offset = u16::from_le_bytes([low, input[i]]) as usize;
                    i += 1;
                    let produced = self.window.produced();
                    if offset == 0 || offset as u64 > produced {
                        return Err(DecodeError::BadOffset { offset, produced });
                    }
                    let len = match_nibble as usize + MIN_MATCH;
                    if match_nibble == 15 {
                        self.state = State::MatchLen { offset, len };
                    } else {
                        self.check_match_end(len)?;
                        self.window.copy(offset, len, out);
                        self.state = State::Token;
                    }
                }
                State::MatchLen { offset, len } => {
                    let b = input[i];
                    i += 1;
                    let len = len + b as usize;
                    self.check_room(len)?;
                    if b == 255 {
                        self.state = State::MatchLen { offset, len };
                    } else {
                        self.check_match_end(len)?;
                        self.window.copy(offset, len, out);
                        self.state = State::Token;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the block: the input must have ended right after a sequence's literals and
    /// the output must be exactly the raw size. Returns the output length.
    pub fn finish(&mut self, out: &mut impl FnMut(&[u8])) -> Result<u64, DecodeError> {
        if self.done {
            return Err(DecodeError::Finished);
        }
        self.done = true;
        self.window.end(self.raw_size, matches!(self.state, State::Offset { .. }), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(raw_size: u64, input: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut got = Vec::new();
        let mut d = Lz4Decoder::new(raw_size);
        let mut sink = |b: &[u8]| got.extend_from_slice(b);
        d.feed(input, &mut sink)?;
        d.finish(&mut sink)?;
        Ok(got)
    }

    #[test]
    fn literals_overlapping_match_and_last_literals() {
        // 'a', match offset 1 length 3+4, then the last sequence's 5 literals (the
        // fewest liblz4 allows after a match).
        let input = [0x13, b'a', 0x01, 0x00, 0x50, b'b', b'c', b'd', b'e', b'f'];
        assert_eq!(decode(13, &input).unwrap(), b"aaaaaaaabcdef");
    }

    #[test]
    fn length_extensions() {
        // 15 + 255 + 0 = 270 literals; match 4 + 15 + 255 + 1 = 275 at offset 270.
        let lits: Vec<u8> = (0..270u32).map(|i| (i * 13 % 256) as u8).collect();
        let mut input = vec![0xff, 255, 0];
        input.extend_from_slice(&lits);
        input.extend_from_slice(&[0x0e, 0x01, 255, 1]);
        input.extend_from_slice(&[0x50, b'v', b'w', b'x', b'y', b'z']);
        let mut expect = lits.clone();
        for k in 0..275 {
            expect.push(expect[k]);
        }
        expect.extend_from_slice(b"vwxyz");
        assert_eq!(decode(expect.len() as u64, &input).unwrap(), expect);
    }

    #[test]
    fn corrupt_inputs_are_errors() {
        assert!(matches!(
            decode(100, &[0x10, b'a', 0x00, 0x00, 0x00]),
            Err(DecodeError::BadOffset { offset: 0, .. })
        ));
        assert!(matches!(
            decode(100, &[0x10, b'a', 0x02, 0x00, 0x00]),
            Err(DecodeError::BadOffset { offset: 2, .. })
        ));
        assert!(matches!(
            decode(20, &[0x1f, b'a', 0x01, 0x00, 255]),
            Err(DecodeError::OutputTooLong { .. })
        ));
        // A run of 255s never loops or overflows: it passes the raw size and stops.
        let mut runaway = vec![0xf0];
        runaway.extend_from_slice(&[255; 100]);
        assert!(matches!(
            decode(1000, &runaway),
            Err(DecodeError::OutputTooLong { .. })
        ));
        // Input ending inside literals, an offset, a length extension, or before any token.
        assert_eq!(decode(3, &[0x30, b'a']), Err(DecodeError::Truncated));
        assert_eq!(decode(99, &[0x10, b'a', 0x01]), Err(DecodeError::Truncated));
        assert_eq!(
            decode(999, &[0x1f, b'a', 0x01, 0x00, 255]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decode(0, &[]), Err(DecodeError::Truncated));
        // A block that ends after a match (no final literals sequence).
        assert_eq!(
            decode(99, &[0x10, b'a', 0x01, 0x00]),
            Err(DecodeError::Truncated)
        );
        assert!(matches!(
            decode(5, &[0x10, b'a']),
            Err(DecodeError::OutputTooShort { .. })
        ));
        // Empty value: a single empty token, as LZ4_decompress_safe wants it.
        assert_eq!(decode(0, &[0x00]).unwrap(), b"");
        assert_eq!(decode(0, &[0x05]), Err(DecodeError::Lz4EndOfBlock));
    }

    #[test]
    fn end_of_block_rules() {
        // A match ending 4 bytes before the end (the last 5 must be literals).
        assert_eq!(
            decode(13, &[0x14, b'a', 0x01, 0x00, 0x40, b'b', b'c', b'd', b'e']),
            Err(DecodeError::Lz4EndOfBlock)
        );
        // A match starting 11 bytes before the end.
        assert_eq!(
            decode(
                13,
                &[0x20, b'a', b'b', 0x01, 0x00, 0x70, 1, 2, 3, 4, 5, 6, 7]
            ),
            Err(DecodeError::Lz4EndOfBlock)
        );
    }
}
