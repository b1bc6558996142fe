//! The bounded output history both decoders copy matches from. A back-reference can
//! reach at most `window` bytes back (pglz 4095, lz4 65535), so that is all that must
//! be kept. The buffer is a Vec that grows to at most `window` + `slack` (64 kB, or the
//! window if larger) and then drops all but its last `window` bytes: one memmove of
//! `window` bytes per `slack` bytes of output, and copies stay contiguous slices (no
//! ring-buffer wrap to split them).
//!
//! Decoded bytes are handed to the sink lazily: everything past `flushed` has not been
//! seen by the sink yet, and is flushed before it could be dropped and at the end of
//! each `feed`.

/// Output gathered past the window before the oldest is dropped: dropping moves `window`
/// bytes, so with pglz's 4 kB window a slack of one window moved half of every byte decoded
/// (a fifth of a streamed 50 MB chat's decoding time); 64 kB moves one in sixteen, and hands
/// the sink pieces of that size.
const SLACK: usize = 64 << 10;

use crate::error::DecodeError;

pub(crate) struct Window {
    buf: Vec<u8>,
    /// `buf[..flushed]` has been handed to the sink.
    flushed: usize,
    window: usize,
    /// Bytes kept past the window before the oldest are dropped.
    slack: usize,
    /// Bytes of output so far, over the whole stream.
    produced: u64,
}

impl Window {
    pub(crate) fn new(window: usize) -> Window {
        Window::with_slack(window, window.max(SLACK))
    }

    fn with_slack(window: usize, slack: usize) -> Window {
        Window {
            buf: Vec::with_capacity(window + slack),
            flushed: 0,
            window,
            slack,
            produced: 0,
        }
    }

    pub(crate) fn produced(&self) -> u64 {
        self.produced
    }

    /// Ends a stream (both formats end the same way): hands over what is left, then the
    /// input must have ended after a whole item and the output must be exactly `raw_size`.
    /// Returns the output length.
    pub(crate) fn end(&mut self, raw_size: u64, whole_item: bool, out: &mut impl FnMut(&[u8])) -> Result<u64, DecodeError> {
        self.flush(out);
        if !whole_item {
            return Err(DecodeError::Truncated);
        }
        if self.produced != raw_size {
            return Err(DecodeError::OutputTooShort { raw_size, produced: self.produced });
        }
        Ok(self.produced)
    }

    /// Hands the not-yet-seen output to the sink.
    pub(crate) fn flush(&mut self, out: &mut impl FnMut(&[u8])) {
        if self.flushed < self.buf.len() {
            out(&self.buf[self.flushed..]);
            self.flushed = self.buf.len();
        }
    }

    /// Makes room for `n <= window` more bytes without the buffer passing `window + slack`,
    /// keeping the last `window` bytes, which is as far back as a copy can reach.
    fn make_room(&mut self, n: usize, out: &mut impl FnMut(&[u8])) {
        debug_assert!(n <= self.window && self.window <= self.slack);
        if self.buf.len() + n > self.window + self.slack {
            self.flush(out);
            let drop = self.buf.len() - self.window;
            self.buf.drain(..drop);
            self.flushed = self.buf.len();
        }
    }

    /// Appends literal bytes.
    pub(crate) fn push(&mut self, data: &[u8], out: &mut impl FnMut(&[u8])) {
        for piece in data.chunks(self.window) {
            self.make_room(piece.len(), out);
            self.buf.extend_from_slice(piece);
            self.produced += piece.len() as u64;
        }
    }

    /// Makes room for `n <= window` bytes to come through `push_byte` and `copy_reserved`.
    pub(crate) fn reserve(&mut self, n: usize, out: &mut impl FnMut(&[u8])) {
        self.make_room(n, out);
    }

    /// Appends one byte, in room `reserve` made.
    pub(crate) fn push_byte(&mut self, byte: u8) {
        self.buf.push(byte);
        self.produced += 1;
    }

    /// `copy` of at most `window` bytes, in room `reserve` made. Everything from `offset`
    /// back on repeats with period `offset`, so copying as much as already exists (offset,
    /// then 2 x offset, ...) is the same as copying byte by byte, in O(log) slice copies.
    pub(crate) fn copy_reserved(&mut self, offset: usize, len: usize) {
        debug_assert!(offset >= 1 && offset <= self.window && offset as u64 <= self.produced && len <= self.window);
        let start = self.buf.len() - offset;
        let target = self.buf.len() + len;
        while self.buf.len() < target {
            let k = (self.buf.len() - start).min(target - self.buf.len());
            self.buf.extend_from_within(start..start + k);
        }
        self.produced += len as u64;
    }

    /// Appends `len` bytes copied from `offset` bytes back. The caller has checked
    /// `1 <= offset <= min(produced, window)`. The copy may overlap its own output
    /// (offset < len, e.g. a run of one byte is offset 1): the result repeats the
    /// `offset` bytes before it.
    pub(crate) fn copy(&mut self, offset: usize, len: usize, out: &mut impl FnMut(&[u8])) {
        debug_assert!(offset >= 1 && offset <= self.window && offset as u64 <= self.produced);
        let mut remaining = len;
        while remaining > 0 {
            let n = remaining.min(self.window);
            // make_room keeps the last `window` bytes, so `offset` bytes back exist.
            self.make_room(n, out);
            self.copy_reserved(offset, n);
            remaining -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(w: &mut Window, got: &mut Vec<u8>) {
        w.flush(&mut |b: &[u8]| got.extend_from_slice(b));
    }

    #[test]
    fn overlapping_copy_repeats_the_period() {
        let mut got = Vec::new();
        let mut w = Window::with_slack(16, 16);
        let mut sink = |b: &[u8]| got.extend_from_slice(b);
        w.push(b"abc", &mut sink);
        w.copy(3, 10, &mut sink);
        w.copy(1, 5, &mut sink);
        w.flush(&mut sink);
        assert_eq!(got, b"abcabcabcabcaaaaaa");
    }

    #[test]
    fn stays_bounded_and_keeps_the_window() {
        let mut got = Vec::new();
        let mut w = Window::with_slack(8, 8);
        let mut expect = Vec::new();
        for i in 0..1000u32 {
            let b = [(i % 251) as u8];
            w.push(&b, &mut |s: &[u8]| got.extend_from_slice(s));
            expect.push(b[0]);
            if i >= 8 {
                let back = expect[expect.len() - 8..expect.len() - 5].to_vec();
                w.copy(8, 3, &mut |s: &[u8]| got.extend_from_slice(s));
                expect.extend_from_slice(&back);
            }
            assert!(w.buf.len() <= 16);
        }
        collect(&mut w, &mut got);
        assert_eq!(got, expect);
        assert_eq!(w.produced(), expect.len() as u64);
    }
}
