//! Reading the source: one SELECT of the three columns, through one portal for the
//! whole run (one transaction), or, for the committing form, a fresh portal per batch over
//! `key > last key ORDER BY key LIMIT n` up to the high-water mark captured when the run
//! started (a portal does not survive COMMIT). Chats are fetched one at a time, so a
//! batch never holds more documents than it is expanding.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::pg::datums::{Chat, ChatText};
use crate::pg::error::{Error, Result};
use super::request::Settings;

/// One row of the source: its chat as read (`Chat`: held, or streamed from its TOAST
/// table), or held whole (`ChatText`).
pub struct Fetched<C = Chat> {
    pub chat_id: Option<String>,
    pub user_id: Option<String>,
    pub chat: Option<C>,
}

impl Fetched {
    /// The same row with its chat held whole, for a reader that needs the whole text
    /// (`verify()`): a streamed chat is read to its end.
    pub fn held(self) -> Result<Fetched<ChatText>> {
        let chat = match self.chat {
            None => None,
            Some(Chat::Held(text)) => Some(text),
            Some(Chat::Toasted(mut stream)) => Some(ChatText::read_whole(&mut stream)?),
        };
        Ok(Fetched { chat_id: self.chat_id, user_id: self.user_id, chat })
    }
}

enum Reading {
    /// One portal for the whole run, which is one transaction.
    Whole { portal: String },
    /// A portal per batch, opened on the batch's first fetch.
    Keyset { query: String, high_water: String, portal: Option<String>, fetched: usize },
}

pub struct Reader {
    reading: Reading,
    /// The key of the last chat fetched: the next keyset portal starts after it.
    read_key: Option<String>,
    /// Chats per keyset portal.
    limit: usize,
}

impl Reader {
    /// Opens one portal over the whole source.
    pub fn whole(settings: &Settings) -> Result<Reader> {
        let portal = Spi::connect(|client| open(client, settings, &select_sql(settings, None, ""), &[]))?;
        Ok(Reader { reading: Reading::Whole { portal }, read_key: None, limit: 0 })
    }

    /// Reads the source in key order after `after` (all of it when `None`) up to
    /// `high_water`, one portal per batch, so the caller may COMMIT between batches.
    pub fn keyset(settings: &Settings, after: Option<String>, high_water: String) -> Reader {
        let condition = settings.key_range_condition(1, 2);
        // A batch rarely needs more chats than messages; the LIMIT keeps the plan an index scan.
        let limit = settings.batch_size;
        let query = select_sql(settings, Some(&condition), &format!(" ORDER BY {} LIMIT {limit}", settings.key_column()));
        Reader { reading: Reading::Keyset { query, high_water, portal: None, fetched: 0 }, read_key: after, limit }
    }

    /// The next chat, or `None` once the source is exhausted.
    pub fn next(&mut self, client: &SpiClient<'_>, settings: &Settings) -> Result<Option<Fetched>> {
        loop {
            let portal = match &mut self.reading {
                Reading::Whole { portal } => portal.clone(),
                Reading::Keyset { query, high_water, portal, .. } => match portal {
                    Some(name) => name.clone(),
                    None => {
                        let after = self.read_key.as_deref().map_or(DatumWithOid::null_oid(pg_sys::TEXTOID), DatumWithOid::from);
                        let name = open(client, settings, query, &[after, DatumWithOid::from(high_water.as_str())])?;
                        *portal = Some(name.clone());
                        name
                    }
                },
            };
            let mut cursor = client.find_cursor(&portal)?;
            let row = {
                let table = cursor.fetch(1)?;
                match table.into_iter().next() {
                    Some(row) => Some(Fetched {
                        chat_id: row.get::<String>(1)?,
                        user_id: row.get::<String>(2)?,
                        chat: row.get::<Chat>(3)?,
                    }),
                    None => None,
                }
            };
            // Keep the portal open for the next fetch (dropping the cursor would close it).
            cursor.detach_into_name();
            let Some(fetched) = row else {
                match &mut self.reading {
                    Reading::Keyset { portal, fetched, .. } if *fetched == self.limit => {
                        // The portal ended at its LIMIT: the next one starts after the last key.
                        close(client, portal.take());
                        *fetched = 0;
                        continue;
                    }
                    _ => return Ok(None),
                }
            };
            if let Reading::Keyset { fetched: n, .. } = &mut self.reading {
                *n += 1;
            }
            if fetched.chat_id.is_some() {
                self.read_key.clone_from(&fetched.chat_id);
            }
            return Ok(Some(fetched));
        }
    }

    /// Ends the batch's reading: the committing form's portal does not survive COMMIT.
    pub fn end_batch(&mut self) {
        if let Reading::Keyset { portal, fetched, .. } = &mut self.reading {
            if let Some(name) = portal.take() {
                Spi::connect(|client| close(client, Some(name)));
            }
            *fetched = 0;
        }
    }

    pub fn close(&mut self) {
        self.end_batch();
        if let Reading::Whole { portal } = &self.reading {
            let name = portal.clone();
            Spi::connect(|client| close(client, Some(name)));
        }
    }
}

fn close(client: &SpiClient<'_>, portal: Option<String>) {
    if let Some(cursor) = portal.and_then(|name| client.find_cursor(&name).ok()) {
        drop(cursor);
    }
}

/// ` WHERE ...` combining the caller's source_filter with `condition` (empty: none).
pub fn source_where(settings: &Settings, condition: Option<&str>) -> String {
    let conditions: Vec<String> =
        settings.source_filter.iter().map(|f| format!("({f})")).chain(condition.map(str::to_owned)).collect();
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// The chat with key `chat_id` as it is now, or `None` when no row with that key passes the
/// filter any more: a streamed chat whose TOAST value is gone after a COMMIT was updated or
/// deleted meanwhile, and only reading it again tells which.
pub fn reread(settings: &Settings, chat_id: &str) -> Result<Option<Fetched>> {
    let sql = select_sql(settings, Some(&settings.key_equals(1)), "");
    Spi::connect(|client| -> Result<Option<Fetched>> {
        let table = client.select(&sql, Some(1), &[DatumWithOid::from(chat_id)])?;
        match table.into_iter().next() {
            Some(row) => Ok(Some(Fetched { chat_id: row.get::<String>(1)?, user_id: row.get::<String>(2)?, chat: row.get::<Chat>(3)? })),
            None => Ok(None),
        }
    })
}

/// The three source columns, filtered, then `tail` (ORDER BY / LIMIT, or empty). Ids as
/// text; the document as stored (a json or text value is its text: a cast would print and
/// re-read it, copying a chat of tens of MB twice), or a jsonb document printed as text.
fn select_sql(settings: &Settings, condition: Option<&str>, tail: &str) -> String {
    let q = pgrx::spi::quote_identifier;
    let as_text = if settings.chat_is_jsonb { "::pg_catalog.text" } else { "" };
    format!(
        "SELECT {}::pg_catalog.text, {}::pg_catalog.text, {}{as_text} FROM {}{}{}{tail}",
        q(&settings.id_column),
        q(&settings.user_id_column),
        q(&settings.chat_column),
        settings.source.name,
        sample_clause(settings),
        source_where(settings, condition)
    )
}

/// ` TABLESAMPLE ...` for a trial run, or empty. The method is qualified: PostgreSQL looks
/// it up as a function name, on the search_path.
pub fn sample_clause(settings: &Settings) -> String {
    match settings.sample_percent {
        Some(percent) => {
            format!(" TABLESAMPLE pg_catalog.system ('{percent:.9}'::pg_catalog.float4) REPEATABLE ('0'::pg_catalog.float8)")
        }
        None => String::new(),
    }
}

/// Opens a portal that outlives the SPI session (until it is closed or the transaction
/// ends). A portal runs exactly one statement, whatever the filter holds.
fn open(client: &SpiClient<'_>, settings: &Settings, query: &str, args: &[DatumWithOid<'_>]) -> Result<String> {
    let cursor = client.try_open_cursor(query, args).map_err(|e| {
        Error::new(
            pgrx::PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
            format!("cannot read source table {}: {e}", settings.source.name),
            "Check source_filter: it must be a boolean SQL expression over the source's columns.",
        )
    })?;
    Ok(cursor.detach_into_name())
}
