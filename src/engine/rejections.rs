//! Messages and chats that did not make it into the target, and recording them in
//! `chat_backfill.rejected_messages` with the caller's own rights (row-level security
//! admits rows only for tables the caller may read and write). A rejection already
//! recorded for the same target, chat, message and SQLSTATE is not recorded again.

use chat_backfill_rules::migration_rows::ChatSkip;
use chat_backfill_rules::scalar::Unstorable;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use crate::pg::datums::varlena_array;
use crate::pg::error::Result;
use super::batch::json_array_oid;
use super::request::Settings;

pub struct Rejection {
    pub chat_id: String,
    pub message_key: Option<String>,
    pub message_id: Option<String>,
    /// PostgreSQL's own SQLSTATE for a failed insert; ours for what the rules reject.
    pub sqlstate: String,
    pub error: String,
    pub detail: Option<String>,
    pub message: Option<String>,
}

pub fn rule_sqlstate(problem: Unstorable) -> &'static str {
    match problem {
        Unstorable::ContainsNul => "22P05",
        Unstorable::UnpairedSurrogate => "22021",
        Unstorable::ObjectInTextColumn | Unstorable::ListNotArrayLiteral => "42804",
        Unstorable::TooManyDimensions => "54000",
        Unstorable::NotBoolean => "22P02",
    }
}

pub fn chat_sqlstate(skip: ChatSkip) -> &'static str {
    match skip {
        ChatSkip::NotJson => "22P02",
        _ => "22023",
    }
}

const RECORD_SQL: &str = "INSERT INTO chat_backfill.rejected_messages \
     (run_id, source, target, source_oid, target_oid, id_column, chat_id, message_key, message_id, sqlstate, error, \
      detail, message) \
     SELECT $1, $2, $3, $4, $5, $13, u.* FROM ROWS FROM (pg_catalog.unnest($6::pg_catalog.text[]), \
     pg_catalog.unnest($7::pg_catalog.text[]), pg_catalog.unnest($8::pg_catalog.text[]), \
     pg_catalog.unnest($9::pg_catalog.text[]), pg_catalog.unnest($10::pg_catalog.text[]), \
     pg_catalog.unnest($11::pg_catalog.text[]), pg_catalog.unnest($12::pg_catalog.json[])) AS u \
     ON CONFLICT DO NOTHING";

pub struct Recorder {
    statement: OwnedPreparedStatement,
}

impl Recorder {
    pub fn prepare() -> Result<Recorder> {
        let text = PgOid::from(pg_sys::TEXTARRAYOID);
        let types = [
            PgOid::from(pg_sys::INT8OID),
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::OIDOID),
            PgOid::from(pg_sys::OIDOID),
            text,
            text,
            text,
            text,
            text,
            text,
            PgOid::from(json_array_oid()),
            PgOid::from(pg_sys::TEXTOID),
        ];
        let statement = Spi::connect(|client| client.prepare_mut(RECORD_SQL, &types).map(|s| s.keep()))?;
        Ok(Recorder { statement })
    }

    pub fn record(&self, settings: &Settings, rejections: &[Rejection]) -> Result<()> {
        if rejections.is_empty() {
            return Ok(());
        }
        let text = |f: &dyn Fn(&Rejection) -> Option<&str>| {
            // SAFETY: a text[] built from text values.
            unsafe { DatumWithOid::new(varlena_array(rejections.iter().map(f), pg_sys::TEXTOID), pg_sys::TEXTARRAYOID) }
        };
        let messages = varlena_array(rejections.iter().map(|r| r.message.as_deref()), pg_sys::JSONOID);
        let args = vec![
            DatumWithOid::from(settings.run_id),
            DatumWithOid::from(settings.source.name.as_str()),
            DatumWithOid::from(settings.target.name.as_str()),
            DatumWithOid::from(settings.source.oid),
            DatumWithOid::from(settings.target.oid),
            text(&|r| Some(r.chat_id.as_str())),
            text(&|r| r.message_key.as_deref()),
            text(&|r| r.message_id.as_deref()),
            text(&|r| Some(r.sqlstate.as_str())),
            text(&|r| Some(r.error.as_str())),
            text(&|r| r.detail.as_deref()),
            // SAFETY: a json[] of the messages' own JSON text (or rows we wrote as JSON).
            unsafe { DatumWithOid::new(messages, json_array_oid()) },
            DatumWithOid::from(settings.id_column.as_str()),
        ];
        Spi::connect_mut(|client| client.update(&self.statement, None, &args).map(drop))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chat_backfill_rules::migration_rows::ChatSkip;
    use chat_backfill_rules::scalar::Unstorable;

    use super::*;
    use crate::pg::error::{sqlstate_code, sqlstate_text};

    /// Every SQLSTATE a rejection records is one PostgreSQL itself raises for that problem (the
    /// reference's INSERT fails with it), and survives packing as an error code.
    #[test]
    fn each_rule_rejection_has_the_reference_s_sqlstate() {
        let expected = [
            (Unstorable::ContainsNul, "22P05"),
            (Unstorable::UnpairedSurrogate, "22021"),
            (Unstorable::ObjectInTextColumn, "42804"),
            (Unstorable::ListNotArrayLiteral, "42804"),
            (Unstorable::TooManyDimensions, "54000"),
            (Unstorable::NotBoolean, "22P02"),
        ];
        for (problem, sqlstate) in expected {
            assert_eq!(rule_sqlstate(problem), sqlstate, "{problem:?}");
            assert_eq!(sqlstate_text(sqlstate_code(sqlstate)), sqlstate);
        }
    }

    #[test]
    fn a_skipped_chat_is_22p02_only_when_its_string_is_not_json() {
        assert_eq!(chat_sqlstate(ChatSkip::NotJson), "22P02");
        for skip in [ChatSkip::Empty, ChatSkip::NotObject, ChatSkip::HistoryNotObject, ChatSkip::MessagesNotObject] {
            assert_eq!(chat_sqlstate(skip), "22023", "{skip:?}");
        }
    }
}
