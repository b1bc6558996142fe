//! What a batch did, and where it left a chat bigger than a batch: what the writer counts
//! into, the committing run checkpoints and the workers sum.

/// What one batch did; `sum()` over batches gives the run's totals.
#[derive(Default, Clone, Debug)]
pub struct BatchReport {
    pub batch: i32,
    /// Chats finished in this batch (a chat spanning batches counts in its last one).
    pub chats_read: i64,
    pub messages_inserted: i64,
    pub messages_rejected: i64,
    pub messages_existing: i64,
    /// The last chat finished: resuming after it loses nothing.
    pub last_chat_id: Option<String>,
    pub elapsed_ms: f64,
    pub messages_skipped: i64,
    pub chats_skipped: i64,
    pub chats_vanished: i64,
    /// The batch_size this batch used (it changes with batch_time).
    pub batch_size: i32,
    /// The chat this batch left unfinished, if any: a resume goes on inside it.
    pub partial: Option<Partial>,
    /// Rows a BEFORE trigger on the target dropped (returned NULL for).
    pub messages_dropped: i64,
    /// How the batch's rows went in (its last write): `direct`, `copy binary`, `copy text`
    /// or `insert`; `None`: nothing was written.
    pub write_path: Option<&'static str>,
}

/// Where a committed batch left a chat bigger than a batch: its first `done` messages are
/// handled (written, recorded or skipped by rule). A resume that finds the same chat again,
/// unchanged (`fingerprint` of its text), goes on with the next message instead of reading
/// it from the first, so every CALL moves the run on however small its max_runtime; a chat
/// changed meanwhile is read whole again (what is there is then counted as existing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    pub chat_id: String,
    pub done: i64,
    pub fingerprint: i64,
}
