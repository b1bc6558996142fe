//! The read path's `currentId` repair (`ChatTable._repair_chat_current_id`), as far as whether
//! it raises: a chat it raises on gets no rows.

use crate::migration_rows::Span;
use crate::scalar::{decode_string, kind, Kind};

use super::message::{AppSkip, fields_at, key_at, truthy};
use super::scan::{elements, member};

/// A value as Python's `>` sees it in the repair's leaf search.
#[derive(Clone)]
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

/// What the repair reads of one message, so that a chat read in pieces (issue 26) is
/// checked without its text: its sanitized key, and what each step of the repair asks of
/// its fields. About a hundred bytes a message, held for one chat.
pub struct MessageFacts {
    key: Box<str>,
    object: bool,
    parent: Parent,
    /// As the current message: `Err` where reading its `output` raises; otherwise whether it
    /// has an id and a role, and whether it is a bad leaf (an assistant output, no parent,
    /// no timestamp) should the chat have more than one message.
    current: Result<(bool, bool), ()>,
    /// A message with a role, for the leaf search: whether it lists children, and its
    /// timestamp as Python compares it.
    leaf: Option<(bool, Ordered)>,
}

/// A message's truthy `parentId`, as the repair links it.
enum Parent {
    None,
    /// A list or an object: cannot be a dict key, so the repair raises.
    Container,
    Text(Box<str>),
    Other,
}

impl MessageFacts {
    /// The facts of the message at `span` of `doc` (the whole document, or a piece holding
    /// the message with the span shifted into it).
    pub(super) fn at(doc: &str, span: Span) -> MessageFacts {
        let key = key_at(doc, span).into_owned().into_boxed_str();
        let Some(f) = fields_at(doc, span) else {
            return MessageFacts { key, object: false, parent: Parent::None, current: Ok((false, false)), leaf: None };
        };
        let parent = match f.parent_id_camel.filter(|p| truthy(p)) {
            None => Parent::None,
            Some(p) => match kind(p) {
                Kind::Array | Kind::Object => Parent::Container,
                Kind::String => Parent::Text(decode_string(p).sanitized().into()),
                _ => Parent::Other,
            },
        };
        let output = f.output.filter(|o| truthy(o));
        let current = match output.map(kind) {
            Some(Kind::Number | Kind::True) => Err(()),
            shape => {
                let output_role = match shape {
                    Some(Kind::Array) => elements(output.unwrap_or("[]")).into_iter().find_map(|item| {
                        (kind(item) == Kind::Object).then(|| member(item, "role").filter(|r| truthy(r))).flatten()
                    }),
                    _ => None,
                };
                let bad_leaf = output_role.is_some_and(|r| kind(r) == Kind::String && decode_string(r).sanitized() == "assistant")
                    && f.parent_id_camel.map_or(true, |p| kind(p) == Kind::Null)
                    && !f.timestamp.is_some_and(truthy);
                Ok((f.id.is_some_and(truthy) && f.role.is_some_and(truthy), bad_leaf))
            }
        };
        let leaf = f.role.is_some_and(truthy).then(|| {
            let listed_children = f.children_ids.is_some_and(|c| kind(c) == Kind::Array && truthy(c));
            (listed_children, f.timestamp.filter(|t| truthy(t)).map_or(Ordered::Number(0.0), Ordered::of))
        });
        MessageFacts { key, object: true, parent, current, leaf }
    }
}

/// `ChatTable._repair_chat_current_id`, run by the app on every chat it loads, as far as
/// whether it raises: links each message to its parent (a `parentId` that is a list or
/// object cannot be a dict key), looks up `currentId` (the same), reads the current
/// message's `output` (a number is not iterable) and, when there is no usable current
/// message, picks the latest leaf by comparing timestamps (a string and a number do not
/// compare). What it changes (`childrenIds`, `currentId`) is never written to a row.
/// Messages are looked up by sanitized key as the app's dict does: a key's last message
/// wins, and only an object is a message there.
pub(super) fn repair(facts: &[MessageFacts], current_id: Option<&str>, poll: &mut dyn FnMut()) -> Result<(), AppSkip> {
    if facts.iter().any(|f| matches!(f.parent, Parent::Container)) {
        return Err(AppSkip::RepairFails);
    }
    let last_with = |key: &str| facts.iter().rposition(|f| &*f.key == key).filter(|&n| facts[n].object);
    let current = match current_id {
        Some(id) if matches!(kind(id), Kind::Array | Kind::Object) => return Err(AppSkip::RepairFails),
        Some(id) if kind(id) == Kind::String => last_with(&decode_string(id).sanitized()),
        _ => None,
    };
    if let Some(n) = current {
        let (usable, bad_leaf) = facts[n].current.map_err(|()| AppSkip::RepairFails)?;
        if usable && !(bad_leaf && facts.len() > 1) {
            return Ok(());
        }
    }
    // The latest leaf: a message no other message names as its parent.
    let mut by_key = std::collections::HashMap::with_capacity(facts.len());
    for (n, f) in facts.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        by_key.insert(&*f.key, n);
    }
    let mut has_child = vec![false; facts.len()];
    for f in facts {
        if let Parent::Text(parent) = &f.parent {
            if let Some(&p) = by_key.get(&**parent).filter(|&&p| facts[p].object) {
                has_child[p] = true;
            }
        }
    }
    drop(by_key);
    let mut latest = Ordered::Number(-1.0);
    for (n, f) in facts.iter().enumerate() {
        if n % 1024 == 0 {
            poll();
        }
        let Some((listed_children, timestamp)) = &f.leaf else { continue };
        if *listed_children || has_child[n] {
            continue;
        }
        match timestamp.greater(&latest) {
            None => return Err(AppSkip::RepairFails),
            Some(true) => latest = timestamp.clone(),
            Some(false) => {}
        }
    }
    Ok(())
}
