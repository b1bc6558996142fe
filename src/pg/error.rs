//! The one error type users see: a stable SQLSTATE, a message naming the object, and a
//! hint saying what to do. Migration scripts branch on the SQLSTATE, not the text.
//! Helpers return it as a value; the SQL entry points raise it, once.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub struct Error {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error { code, message: message.into(), detail: None, hint: hint.into() }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Raises the error in PostgreSQL (does not return).
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code, self.message, "chat_backfill").set_hint(self.hint);
        if let Some(detail) = self.detail {
            report = report.set_detail(detail);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

/// An internal query that PostgreSQL answered in a way pgrx could not hand back (wrong
/// shape, no row): a broken invariant, not the user's doing.
impl From<pgrx::spi::Error> for Error {
    fn from(e: pgrx::spi::Error) -> Self {
        Error::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("chat_backfill: an internal query failed: {e}"),
            "This is a bug in chat_backfill; please report it with the server log.",
        )
    }
}

/// Raises `Err` at the SQL boundary; passes `Ok` through.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

/// The five-character SQLSTATE of a PostgreSQL error code (unpacks MAKE_SQLSTATE).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    packed_sqlstate_text(code as i32)
}

/// The same, of a code as PostgreSQL packed it, which may be one PgSqlErrorCode lacks.
pub fn packed_sqlstate_text(packed: i32) -> String {
    (0..5).map(|i| (((packed >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

/// The error code of a five-character SQLSTATE (packs it as MAKE_SQLSTATE does).
pub fn sqlstate_code(sqlstate: &str) -> PgSqlErrorCode {
    let packed = sqlstate.bytes().take(5).enumerate().fold(0i32, |acc, (i, c)| acc | ((i32::from(c.wrapping_sub(b'0')) & 0x3F) << (6 * i)));
    PgSqlErrorCode::from(packed)
}

#[cfg(test)]
mod tests {
    use pgrx::PgSqlErrorCode::*;

    use super::*;

    #[test]
    fn sqlstate_text_unpacks_make_sqlstate() {
        assert_eq!(sqlstate_text(ERRCODE_INSUFFICIENT_PRIVILEGE), "42501");
        assert_eq!(sqlstate_text(ERRCODE_UNIQUE_VIOLATION), "23505");
        assert_eq!(sqlstate_text(ERRCODE_INVALID_TEXT_REPRESENTATION), "22P02");
        assert_eq!(sqlstate_text(ERRCODE_READ_ONLY_SQL_TRANSACTION), "25006");
    }

    #[test]
    fn sqlstate_code_is_sqlstate_texts_inverse() {
        for text in ["42501", "23503", "22P05", "22021", "42804", "54000", "22P02", "22023", "53400", "55P03", "0A000"] {
            assert_eq!(sqlstate_text(sqlstate_code(text)), text);
        }
        assert!(matches!(sqlstate_code("42501"), ERRCODE_INSUFFICIENT_PRIVILEGE));
    }
}
