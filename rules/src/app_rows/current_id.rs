//! The read path's `currentId` repair (`ChatTable._repair_chat_current_id`), as far as whether
//! it raises: a chat it raises on gets no rows.

use crate::migration_rows::Span;
use crate::scalar::{decode_string, kind, Kind};

use super::message::{AppSkip, Fields, fields_at, key_at, truthy};
use super::scan::{elements, member};

/// A value as Python's `>` sees it in the repair's leaf search.
enum Ordered {
    Number(f64),
    Text(String),
    List,
    Unordered,
}

impl Ordered {
    fn of(raw: &str) -> Ordered {
        match kind(raw) {
            Kind::True => Ordered::Number(1.0),
            Kind::False | Kind::Null => Ordered::Number(0.0),
            Kind::Number => Ordered::Number(raw.parse().unwrap_or(f64::NAN)),
            Kind::String => Ordered::Text(decode_string(raw).sanitized().into_owned()),
            Kind::Array => Ordered::List,
            Kind::Object => Ordered::Unordered,
        }
    }

    /// `self > other`, or `None` where Python raises TypeError. Lists compare element by
    /// element in Python; here two lists never replace each other (an approximation for a
    /// list-valued timestamp, which no client writes).
    fn greater(&self, other: &Ordered) -> Option<bool> {
        match (self, other) {
            (Ordered::Number(a), Ordered::Number(b)) => Some(a > b),
            (Ordered::Text(a), Ordered::Text(b)) => Some(a > b),
            (Ordered::List, Ordered::List) => Some(false),
            _ => None,
        }
    }
}

/// What the repair reads of each message, in columns, so that a chat read in pieces (issue
/// 26) is checked without its text: about 18 bytes a message, plus its sanitized key and a
/// string `parentId`'s text (a real chat's: two UUIDs), plus a string timestamp's.
#[derive(Default)]
pub struct Facts {
    keys: String,
    key_ends: Vec<u32>,
    parents: String,
    parent_ends: Vec<u32>,
    flags: Vec<u16>,
    /// A number timestamp (`Ordered::Number`); a string one is in `text_stamps`.
    stamps: Vec<f64>,
    text_stamps: Vec<(u32, Box<str>)>,
}

/// The message is an object (else only its key counts).
const OBJECT: u16 = 1;
/// Its truthy `parentId` is a list or an object (the repair raises), or a string.
const PARENT_CONTAINER: u16 = 1 << 1;
const PARENT_TEXT: u16 = 1 << 2;
/// As the current message: reading its `output` raises; it has an id and a role; it is a bad
/// leaf (an assistant output, no parent, no timestamp) should the chat have more than one
/// message.
const CURRENT_RAISES: u16 = 1 << 3;
const USABLE: u16 = 1 << 4;
const BAD_LEAF: u16 = 1 << 5;
/// It has a role (the leaf search looks at it), and lists children.
const LEAF: u16 = 1 << 6;
const LISTED_CHILDREN: u16 = 1 << 7;
/// Its timestamp, as Python compares it: a number (in `stamps`), a string (in
/// `text_stamps`), a list, or something that compares with nothing.
const STAMP_TEXT: u16 = 1 << 8;
const STAMP_LIST: u16 = 1 << 9;
const STAMP_UNORDERED: u16 = 1 << 10;

impl Facts {
    /// The message at `span` of `doc` (the whole document, or a piece holding the message
    /// with the span shifted into it), after those before it.
    pub(super) fn push(&mut self, doc: &str, span: Span) {
        let n = self.flags.len() as u32;
        self.keys.push_str(&key_at(doc, span));
        self.key_ends.push(self.keys.len() as u32);
        let (flags, stamp) = match fields_at(doc, span) {
            None => (0, 0.0),
            Some(f) => self.fields(n, &f),
        };
        self.parent_ends.push(self.parents.len() as u32);
        self.flags.push(flags);
        self.stamps.push(stamp);
    }

    fn fields(&mut self, n: u32, f: &Fields<'_>) -> (u16, f64) {
        let mut flags = OBJECT;
        if let Some(p) = f.parent_id_camel.filter(|p| truthy(p)) {
            match kind(p) {
                Kind::Array | Kind::Object => flags |= PARENT_CONTAINER,
                Kind::String => {
                    flags |= PARENT_TEXT;
                    self.parents.push_str(&decode_string(p).sanitized());
                }
                _ => {}
            }
        }
        let output = f.output.filter(|o| truthy(o));
        match output.map(kind) {
            Some(Kind::Number | Kind::True) => flags |= CURRENT_RAISES,
            shape => {
                let output_role = match shape {
                    Some(Kind::Array) => elements(output.unwrap_or("[]")).into_iter().find_map(|item| {
                        (kind(item) == Kind::Object).then(|| member(item, "role").filter(|r| truthy(r))).flatten()
                    }),
                    _ => None,
                };
                if output_role.is_some_and(|r| kind(r) == Kind::String && decode_string(r).sanitized() == "assistant")
                    && f.parent_id_camel.map_or(true, |p| kind(p) == Kind::Null)
                    && !f.timestamp.is_some_and(truthy)
                {
                    flags |= BAD_LEAF;
                }
                if f.id.is_some_and(truthy) && f.role.is_some_and(truthy) {
                    flags |= USABLE;
                }
            }
        }
        let mut stamp = 0.0;
        if f.role.is_some_and(truthy) {
            flags |= LEAF;
            if f.children_ids.is_some_and(|c| kind(c) == Kind::Array && truthy(c)) {
                flags |= LISTED_CHILDREN;
            }
            match f.timestamp.filter(|t| truthy(t)).map_or(Ordered::Number(0.0), Ordered::of) {
                Ordered::Number(x) => stamp = x,
                Ordered::Text(t) => {
                    flags |= STAMP_TEXT;
                    self.text_stamps.push((n, t.into_boxed_str()));
                }
                Ordered::List => flags |= STAMP_LIST,
                Ordered::Unordered => flags |= STAMP_UNORDERED,
            }
        }
        (flags, stamp)
    }

    fn len(&self) -> usize {
        self.flags.len()
    }

    fn key(&self, n: usize) -> &str {
        let start = if n == 0 { 0 } else { self.key_ends[n - 1] as usize };
        &self.keys[start..self.key_ends[n] as usize]
    }

    fn parent(&self, n: usize) -> Option<&str> {
        let start = if n == 0 { 0 } else { self.parent_ends[n - 1] as usize };
        (self.flags[n] & PARENT_TEXT != 0).then(|| &self.parents[start..self.parent_ends[n] as usize])
    }

    fn stamp(&self, n: usize) -> Ordered {
        let flags = self.flags[n];
        if flags & STAMP_TEXT != 0 {
            let at = self.text_stamps.partition_point(|(m, _)| (*m as usize) < n);
            return Ordered::Text(self.text_stamps[at].1.to_string());
        }
        match flags {
            f if f & STAMP_LIST != 0 => Ordered::List,
            f if f & STAMP_UNORDERED != 0 => Ordered::Unordered,
            _ => Ordered::Number(self.stamps[n]),
        }
    }

    /// The message the app's dict holds under `key`, if it is an object: a key's last
    /// message wins. `by_hash` is (hash of the key, message number), sorted.
    fn dict_at(&self, by_hash: &[(u64, u32)], key: &str) -> Option<usize> {
        let h = key_hash(key);
        let from = by_hash.partition_point(|&(k, _)| k < h);
        let to = from + by_hash[from..].partition_point(|&(k, _)| k == h);
        // Equal hashes: the key itself decides.
        let last = by_hash[from..to].iter().rev().map(|&(_, n)| n as usize).find(|&n| self.key(n) == key)?;
        (self.flags[last] & OBJECT != 0).then_some(last)
    }
}

fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// `ChatTable._repair_chat_current_id`, run by the app on every chat it loads, as far as
/// whether it raises: links each message to its parent (a `parentId` that is a list or
/// object cannot be a dict key), looks up `currentId` (the same), reads the current
/// message's `output` (a number is not iterable) and, when there is no usable current
/// message, picks the latest leaf by comparing timestamps (a string and a number do not
/// compare). What it changes (`childrenIds`, `currentId`) is never written to a row.
/// Messages are looked up by sanitized key as the app's dict does: a key's last message
/// wins, and only an object is a message there.
pub(super) fn repair(facts: &Facts, current_id: Option<&str>, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    if facts.flags.iter().any(|f| f & PARENT_CONTAINER != 0) {
        return Err(AppSkip::RepairFails);
    }
    let current = match current_id {
        Some(id) if matches!(kind(id), Kind::Array | Kind::Object) => return Err(AppSkip::RepairFails),
        Some(id) if kind(id) == Kind::String => {
            let decoded = decode_string(id);
            let id = decoded.sanitized();
            (0..facts.len()).rev().find(|&n| facts.key(n) == id).filter(|&n| facts.flags[n] & OBJECT != 0)
        }
        _ => None,
    };
    if let Some(n) = current {
        let flags = facts.flags[n];
        if flags & CURRENT_RAISES != 0 {
            return Err(AppSkip::RepairFails);
        }
        if flags & USABLE != 0 && !(flags & BAD_LEAF != 0 && facts.len() > 1) {
            return Ok(());
        }
    }
    // The latest leaf: a message no other message names as its parent. 12 bytes a message
    // while it is searched for.
    let mut by_hash = Vec::with_capacity(facts.len());
    for n in 0..facts.len() {
        if n % 1024 == 0 {
            poll();
        }
        by_hash.push((key_hash(facts.key(n)), n as u32));
    }
    by_hash.sort_unstable();
    let mut has_child = vec![false; facts.len()];
    for n in 0..facts.len() {
        if n % 1024 == 0 {
            poll();
        }
        if let Some(p) = facts.parent(n).and_then(|parent| facts.dict_at(&by_hash, parent)) {
            has_child[p] = true;
        }
    }
    drop(by_hash);
    let mut latest = Ordered::Number(-1.0);
    for n in 0..facts.len() {
        if n % 1024 == 0 {
            poll();
        }
        let flags = facts.flags[n];
        if flags & LEAF == 0 || flags & LISTED_CHILDREN != 0 || has_child[n] {
            continue;
        }
        let timestamp = facts.stamp(n);
        match timestamp.greater(&latest) {
            None => return Err(AppSkip::RepairFails),
            Some(true) => latest = timestamp,
            Some(false) => {}
        }
    }
    Ok(())
}
