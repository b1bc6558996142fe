//! Chats read a slice at a time from their TOAST table (issue 26): the index pass over
//! the stream (where the entries lie, the text's fingerprint, UTF-8) and the expansion's
//! cursor, which holds the text from the next entry on; and the fingerprint of a chat's
//! text that a checkpoint inside a chat keeps, whole or as it streams. The engine (`backfill`) opens a
//! chat this way when `read` gives it as `Chat::Toasted`.

use chat_backfill_rules::app_rows::{self, AppSkip, StreamOpen, StreamOpened};
use chat_backfill_rules::migration_rows::{self, Body, Keys, Span};
use chat_backfill_rules::stream_index::{StreamIndex, Streamed as StreamIndexed};

use crate::pg::datums::ChatText;
use crate::pg::error::Result;
use crate::pg::toast_read::ToastStream;

/// A fingerprint of a chat's text, stable across processes and releases (a checkpoint
/// outlives both): a multiply-rotate hash over 8-byte words, and the length.
pub fn fingerprint(text: &[u8]) -> i64 {
    let mut f = Fingerprinter::new(text.len());
    f.update(text);
    f.finish()
}

/// `fingerprint` of a text given in pieces, whose length is known up front (a stream's
/// raw size): the same words, carried over between pieces.
pub struct Fingerprinter {
    h: u64,
    word: [u8; 8],
    filled: usize,
}

const FINGERPRINT_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Fingerprinter {
    pub fn new(len: usize) -> Fingerprinter {
        Fingerprinter { h: len as u64, word: [0; 8], filled: 0 }
    }

    pub fn update(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            let n = (8 - self.filled).min(piece.len());
            self.word[self.filled..self.filled + n].copy_from_slice(&piece[..n]);
            self.filled += n;
            piece = &piece[n..];
            if self.filled == 8 {
                self.h = (self.h.rotate_left(5) ^ u64::from_le_bytes(self.word)).wrapping_mul(FINGERPRINT_K);
                self.filled = 0;
            }
        }
    }

    pub fn finish(mut self) -> i64 {
        self.word[self.filled..].fill(0);
        let h = (self.h.rotate_left(5) ^ u64::from_le_bytes(self.word)).wrapping_mul(FINGERPRINT_K);
        (h ^ (h >> 29)) as i64
    }
}

/// UTF-8 checked across pieces: a character split between two is carried (at most 3
/// bytes) to the next.
#[derive(Default)]
pub struct Utf8Check {
    carry: Vec<u8>,
    bad: bool,
}

impl Utf8Check {
    pub fn update(&mut self, piece: &[u8]) {
        if self.bad {
            return;
        }
        let mut joined;
        let bytes = if self.carry.is_empty() {
            piece
        } else {
            joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(piece);
            &joined[..]
        };
        match std::str::from_utf8(bytes) {
            Ok(_) => self.carry.clear(),
            // Cut inside a character at the end: the rest comes with the next piece.
            Err(e) if e.error_len().is_none() => self.carry = bytes[e.valid_up_to()..].to_vec(),
            Err(_) => self.bad = true,
        }
    }

    /// Whether everything given was UTF-8, whole characters.
    pub fn finish(self) -> bool {
        !self.bad && self.carry.is_empty()
    }
}

/// A chat read a slice at a time from its TOAST table (`Chat::Toasted`, issue 26): its
/// entries are expanded in the document's order from the stream, which holds the text from
/// the next entry's key to the end of what was read, never the chat.
pub struct Streamed {
    stream: ToastStream,
    /// The document's bytes from offset `from` on, as far as the stream has given them.
    held: Vec<u8>,
    from: usize,
}

impl Streamed {
    pub fn new(stream: ToastStream) -> Streamed {
        Streamed { stream, held: Vec::new(), from: 0 }
    }

    pub fn stream(&self) -> &ToastStream {
        &self.stream
    }

    /// Back to the document's first byte, for another pass over its entries.
    pub fn rewind(&mut self) {
        self.stream.restart();
        self.held = Vec::new();
        self.from = 0;
    }

    /// The text of `range` (offsets in the document), reading on as far as it ends and
    /// dropping what lies before it: ranges must come in increasing order. `None` when the
    /// chat's TOAST value is gone (its row updated or deleted, and vacuumed, since a COMMIT
    /// between batches, or its table rewritten).
    pub fn text(&mut self, range: std::ops::Range<usize>) -> Result<Option<&str>> {
        let (start, end) = (range.start, range.end);
        // What lies before `start` is dropped once it is half of what is held: each byte is
        // moved at most once (dropping it at every entry moved a whole slice per message).
        let passed = start.saturating_sub(self.from).min(self.held.len());
        if passed * 2 >= self.held.len() {
            self.held.drain(..passed);
            self.from += passed;
        }
        let Streamed { stream, held, from, .. } = self;
        while *from + held.len() < end {
            let more = stream.next_slice_unless_gone(&mut |piece: &[u8]| {
                // Nothing held is wanted any more, and what comes before `start` (between two
                // entries, or text that is no entry) is not kept.
                if *from + held.len() <= start {
                    *from += held.len();
                    held.clear();
                }
                let skip = if held.is_empty() { start.saturating_sub(*from).min(piece.len()) } else { 0 };
                *from += skip;
                held.extend_from_slice(&piece[skip..]);
            })?;
            match more {
                None => return Ok(None),
                Some(false) if *from + held.len() < end => {
                    return Err(stream.corrupted(&"the document ended before its indexed entries"));
                }
                Some(_) => {}
            }
        }
        std::str::from_utf8(&self.held[start - self.from..end - self.from])
            .map(Some)
            .map_err(|_| self.stream.corrupted(&"an entry is not UTF-8"))
    }
}

/// How a chat was indexed.
pub enum Indexed {
    /// Held: its entries, and where its document lies in the text.
    Held(Vec<Span>, Body),
    /// Streamed: its entries, in the document's order (offsets from the document's first
    /// byte, as `StreamIndex` gives them).
    Streamed(Vec<Span>),
    /// Read whole after all (see `index_streamed`).
    Whole(ChatText),
}

/// Reads a streamed document through, giving each piece to `each` (with the UTF-8 check
/// done here) while it is a JSON object: `None` if it is not one (it stops there, for the
/// caller to read it whole), else whether every byte was UTF-8.
fn stream_object(stream: &mut ToastStream, mut each: impl FnMut(&[u8])) -> Result<Option<bool>> {
    let mut utf8 = Utf8Check::default();
    let mut object = None;
    while stream.next_slice(&mut |piece: &[u8]| {
        if object.is_none() {
            object = piece.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).map(|b| *b == b'{');
        }
        // Whitespace before the document is fed too: offsets count from the first byte.
        if object != Some(false) {
            utf8.update(piece);
            each(piece);
        }
    })? {
        if object == Some(false) {
            break;
        }
    }
    Ok((object == Some(true)).then(|| utf8.finish()))
}

/// The index pass over a streamed chat: where its entries lie (`StreamIndex`, the same
/// entries as the whole text's index), its fingerprint and its UTF-8, as the text streams.
/// A document that is not an object (a JSON string holding one, which is decoded into a
/// copy) or whose messages repeat a key (Python keeps its first place and its last value,
/// out of the document's order) is read whole instead, as are the hostile shapes the
/// streamed index leaves to the whole text.
pub fn index_streamed(
    stream: &mut ToastStream,
    fingerprinted: &mut Option<i64>,
) -> Result<std::result::Result<Indexed, migration_rows::ChatSkip>> {
    let mut index = StreamIndex::new(Keys::Exact);
    let mut print = Fingerprinter::new(stream.raw_size());
    let mut failed = None;
    let mut poll = || {
        pgrx::check_for_interrupts!();
    };
    let utf8 = stream_object(stream, |piece| {
        print.update(piece);
        if failed.is_none() {
            failed = index.feed(piece, &mut poll).err();
        }
    })?;
    let Some(utf8) = utf8 else {
        return Ok(Ok(Indexed::Whole(ChatText::read_whole(&mut stream.restart())?)));
    };
    if !utf8 {
        return Ok(Err(migration_rows::ChatSkip::NotJson));
    }
    *fingerprinted = Some(print.finish());
    if let Some(skip) = failed {
        return Ok(Err(skip));
    }
    match index.finish(&mut poll) {
        Err(skip) => Ok(Err(skip)),
        Ok(StreamIndexed::Indexed(found, _)) => Ok(migration_rows::spans_of(found).map(Indexed::Streamed)),
        Ok(StreamIndexed::RepeatedKeys { .. } | StreamIndexed::ReadWhole(_)) => {
            Ok(Ok(Indexed::Whole(ChatText::read_whole(&mut stream.restart())?)))
        }
    }
}

/// How a chat was opened for app rows.
pub enum AppIndexed {
    /// Streamed: its messages and `currentId` (offsets from the text's first byte), and the
    /// app's codec for it.
    Streamed(app_rows::Indexed, app_rows::Codec),
    /// Read whole after all: not an object, or a shape the stream leaves to the whole text.
    Whole(ChatText),
}

/// The app's `open` and `index` over a streamed chat (`StreamOpen`): the same codec,
/// messages and `currentId` as the whole text, or the same reason the app loads nothing.
pub fn index_app_streamed(
    stream: &mut ToastStream,
    user_id: Option<&str>,
) -> Result<std::result::Result<AppIndexed, AppSkip>> {
    let mut open = StreamOpen::default();
    let mut poll = || {
        pgrx::check_for_interrupts!();
    };
    let Some(utf8) = stream_object(stream, |piece| open.feed(piece, &mut poll))? else {
        return Ok(Ok(AppIndexed::Whole(ChatText::read_whole(&mut stream.restart())?)));
    };
    if !utf8 {
        return Ok(Err(AppSkip::NotObject));
    }
    Ok(match open.finish(user_id, app_rows::APP_MAX_DEPTH, &mut poll) {
        Ok(StreamOpened::Indexed(indexed, codec)) => Ok(AppIndexed::Streamed(indexed, codec)),
        Ok(StreamOpened::ReadWhole) => Ok(AppIndexed::Whole(ChatText::read_whole(&mut stream.restart())?)),
        Err(skip) => Err(skip),
    })
}

/// A chat's messages for a pass over them in the document's order (app rows of a chat
/// bigger than a batch take several): the text held, or the stream read again from its
/// start for each pass.
pub enum Messages<'a> {
    Held(&'a str),
    Streamed(&'a mut Streamed),
}

impl Messages<'_> {
    /// Before a pass.
    pub fn rewind(&mut self) {
        if let Messages::Streamed(streamed) = self {
            streamed.rewind();
        }
    }

    /// The text of `range` (offsets as the chat's spans): ranges in increasing order
    /// between two rewinds.
    pub fn text(&mut self, range: std::ops::Range<usize>) -> Result<&str> {
        match self {
            Messages::Held(doc) => Ok(&doc[range]),
            // Read in this transaction's snapshot, which keeps the value (see
            // `Backfill::next_batch`): gone now, it was changed under the run after all.
            Messages::Streamed(streamed) => streamed.text(range)?.ok_or_else(streamed_gone),
        }
    }

    /// The text holding the message at `span`, and the span within that text.
    pub fn message(&mut self, span: Span) -> Result<(&str, Span)> {
        if let Messages::Held(doc) = self {
            return Ok((*doc, span));
        }
        let bytes = span.bytes();
        let text = self.text(bytes.clone())?;
        Ok((text, span.shifted_back(bytes.start)))
    }
}

/// The app's repair check over a chat's messages read in one pass (held, or streamed from
/// its start): what it needs of each message, and `currentId`, which lies before or after
/// the messages in the document. `each` sees every message on the way (the text holding
/// it, and its span there), so that a caller's own look at them costs no pass of its own.
pub fn repair_check(
    messages: &mut Messages,
    spans: &[Span],
    current_id: Option<std::ops::Range<usize>>,
    poll: &mut dyn FnMut(),
    mut each: impl FnMut(&str, Span),
) -> Result<std::result::Result<(), AppSkip>> {
    let mut repair = app_rows::RepairCheck::default();
    let first = spans.first().map_or(usize::MAX, |s| s.bytes().start);
    let mut current = match &current_id {
        Some(r) if r.end <= first => Some(messages.text(r.clone())?.to_owned()),
        _ => None,
    };
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let (text, span) = messages.message(span)?;
        repair.add(text, span);
        each(text, span);
    }
    if let (None, Some(r)) = (&current, current_id) {
        current = Some(messages.text(r)?.to_owned());
    }
    Ok(repair.finish(current.as_deref(), poll))
}

fn streamed_gone() -> crate::pg::error::Error {
    crate::pg::error::Error::new(
        pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "a streamed chat's TOAST value went while its rows were being written".to_owned(),
        "CALL the backfill again: it goes on from its checkpoint and reads the chat again.",
    )
}

#[cfg(test)]
mod fingerprint_tests {
    use super::{fingerprint, Fingerprinter, Utf8Check};

    /// Checkpoints keep fingerprints across releases: the function must never change. The
    /// values were computed by an independent implementation of the same definition.
    #[test]
    fn fingerprints_are_stable() {
        assert_eq!(fingerprint(b""), 0);
        assert_eq!(fingerprint(b"a"), -5_715_860_101_994_261_550);
        assert_eq!(fingerprint(b"12345678"), -6_136_387_933_679_464_117);
        assert_eq!(fingerprint(br#"{"history":{"messages":{}}}"#), -1_574_588_376_558_343_103);
    }

    #[test]
    fn a_text_in_pieces_has_the_fingerprint_of_the_whole() {
        let text: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 999, 1000] {
            for step in [1, 2, 3, 5, 8, 13, 64, 1000] {
                let mut f = Fingerprinter::new(len);
                text[..len].chunks(step).for_each(|piece| f.update(piece));
                assert_eq!(f.finish(), fingerprint(&text[..len]), "len {len} step {step}");
            }
        }
    }

    #[test]
    fn utf8_is_checked_across_pieces() {
        let text = "aé中🙂z".repeat(50);
        for step in 1..9 {
            let mut check = Utf8Check::default();
            text.as_bytes().chunks(step).for_each(|piece| check.update(piece));
            assert!(check.finish(), "step {step}");
        }
        for bad in [&b"a\xff"[..], b"\xe4\xb8", b"\xe4\xb8a", b"\xc0\x80"] {
            let mut check = Utf8Check::default();
            bad.chunks(1).for_each(|piece| check.update(piece));
            assert!(!check.finish(), "{bad:?}");
        }
    }

    #[test]
    fn one_byte_changes_the_fingerprint() {
        let a = br#"{"history":{"messages":{"a":{"content":"hello"}}}}"#.to_vec();
        let mut b = a.clone();
        b[40] ^= 1;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&a[..a.len() - 1]));
    }
}
