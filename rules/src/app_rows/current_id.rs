//! The read path's `currentId` repair (`ChatTable._repair_chat_current_id`), as far as whether
//! it raises: a chat it raises on gets no rows.

use crate::migration_rows::Span;
use crate::scalar::{decode_string, kind, Kind};

use super::message::{AppSkip, Fields, fields_at, key_at, truthy};
use super::scan::{elements, member};

/// Looks messages up by sanitized key as the app's dict does: a key's last message wins.
struct Lookup<'a> {
    doc: &'a str,
    spans: &'a [Span],
    /// (hash of the key, message number), sorted; built only when the leaf search needs it.
    by_hash: Vec<(u64, u32)>,
}

impl<'a> Lookup<'a> {
    fn new(doc: &'a str, spans: &'a [Span], poll: &mut dyn FnMut()) -> Lookup<'a> {
        let mut by_hash = Vec::with_capacity(spans.len());
        for (n, &span) in spans.iter().enumerate() {
            if n % 1024 == 0 {
                poll();
            }
            by_hash.push((key_hash(&key_at(doc, span)), n as u32));
        }
        by_hash.sort_unstable();
        Lookup { doc, spans, by_hash }
    }

    /// The message the app's dict holds under `key`, if it is an object (`dict_at`).
    fn dict_at(&self, key: &str) -> Option<usize> {
        let h = key_hash(key);
        let from = self.by_hash.partition_point(|&(k, _)| k < h);
        // Hashes equal: the key itself decides; the last message with it wins.
        let to = from + self.by_hash[from..].partition_point(|&(k, _)| k == h);
        let last = self.by_hash[from..to]
            .iter()
            .rev()
            .map(|&(_, n)| n as usize)
            .find(|&n| key_at(self.doc, self.spans[n]) == key)?;
        fields_at(self.doc, self.spans[last]).is_some().then_some(last)
    }
}

/// The last message whose sanitized key is `key`, if it is an object: one pass, no index.
fn scan_dict_at(doc: &str, spans: &[Span], key: &str, poll: &mut dyn FnMut()) -> Option<usize> {
    let mut last = None;
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        if key_at(doc, span) == key {
            last = Some(n);
        }
    }
    last.filter(|&n| fields_at(doc, spans[n]).is_some())
}

fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

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

/// `ChatTable._repair_chat_current_id`, run by the app on every chat it loads, as far as
/// whether it raises: links each message to its parent (a `parentId` that is a list or
/// object cannot be a dict key), looks up `currentId` (the same), reads the current
/// message's `output` (a number is not iterable) and, when there is no usable current
/// message, picks the latest leaf by comparing timestamps (a string and a number do not
/// compare). What it changes (`childrenIds`, `currentId`) is never written to a row.
/// Each message's fields are read again where a step needs them, so nothing per message
/// is kept but the leaf search's index.
pub(super) fn repair(doc: &str, spans: &[Span], current_id: Option<&str>, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    fn parent_of<'a>(f: &Fields<'a>) -> Option<&'a str> {
        f.parent_id_camel.filter(|p| truthy(p))
    }
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let fields = fields_at(doc, span);
        if fields.as_ref().and_then(parent_of).is_some_and(|p| matches!(kind(p), Kind::Array | Kind::Object)) {
            return Err(AppSkip::RepairFails);
        }
    }
    let current = match current_id {
        Some(id) if matches!(kind(id), Kind::Array | Kind::Object) => return Err(AppSkip::RepairFails),
        Some(id) if kind(id) == Kind::String => scan_dict_at(doc, spans, &decode_string(id).sanitized(), poll),
        _ => None,
    };
    if let Some(current) = current.and_then(|n| fields_at(doc, spans[n])) {
        let output = current.output.filter(|o| truthy(o));
        let output_role = match output.map(kind) {
            Some(Kind::Number | Kind::True) => return Err(AppSkip::RepairFails),
            Some(Kind::Array) => elements(output.unwrap_or("[]")).into_iter().find_map(|item| {
                (kind(item) == Kind::Object).then(|| member(item, "role").filter(|r| truthy(r))).flatten()
            }),
            _ => None,
        };
        let bad_leaf = output_role.is_some_and(|r| kind(r) == Kind::String && decode_string(r).sanitized() == "assistant")
            && current.parent_id_camel.map_or(true, |p| kind(p) == Kind::Null)
            && !current.timestamp.is_some_and(truthy)
            && spans.len() > 1;
        if current.id.is_some_and(truthy) && current.role.is_some_and(truthy) && !bad_leaf {
            return Ok(());
        }
    }
    // The latest leaf: a message no other message names as its parent.
    let lookup = Lookup::new(doc, spans, poll);
    let mut has_child = vec![false; spans.len()];
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let Some(parent) = fields_at(doc, span).as_ref().and_then(parent_of) else { continue };
        if kind(parent) == Kind::String {
            if let Some(p) = lookup.dict_at(&decode_string(parent).sanitized()) {
                has_child[p] = true;
            }
        }
    }
    drop(lookup);
    let mut latest = Ordered::Number(-1.0);
    for (n, &span) in spans.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let Some(f) = fields_at(doc, span).filter(|f| f.role.is_some_and(truthy)) else { continue };
        let listed_children = f.children_ids.is_some_and(|c| kind(c) == Kind::Array && truthy(c));
        if listed_children || has_child[n] {
            continue;
        }
        let timestamp = f.timestamp.filter(|t| truthy(t)).map_or(Ordered::Number(0.0), Ordered::of);
        match timestamp.greater(&latest) {
            None => return Err(AppSkip::RepairFails),
            Some(true) => latest = timestamp,
            Some(false) => {}
        }
    }
    Ok(())
}
