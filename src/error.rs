//! The one error type users see: a stable SQLSTATE, a message naming the object, and a
//! hint saying what to do. Migration scripts branch on the SQLSTATE, not the text.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub struct UsageError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: String,
}

impl UsageError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> Self {
        UsageError { code, message: message.into(), detail: None, hint: hint.into() }
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

/// The five-character SQLSTATE of a PostgreSQL error code (unpacks MAKE_SQLSTATE).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let packed = code as i32;
    (0..5).map(|i| (((packed >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}
