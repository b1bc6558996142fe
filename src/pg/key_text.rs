//! One text for a key, whatever the session: a non-text chat id is printed (into the
//! message ids, the high-water mark, checkpoints, key ranges) and read back in other
//! transactions, sessions and workers, so every setting that changes how a key type prints
//! is pinned while the work runs, and the caller gets its own values back afterwards.

use core::ffi::CStr;

use pgrx::prelude::*;

/// The settings that change a key's text, with the values every session reads back alike:
/// ISO dates (read the same whatever DateStyle's field order), intervals in PostgreSQL's
/// own style, timestamps with time zone in UTC, floats in full (shortest exact), bytea in
/// hex, money in the C locale.
pub const PINNED: [(&CStr, &CStr); 6] = [
    (c"datestyle", c"ISO"),
    (c"intervalstyle", c"postgres"),
    (c"timezone", c"UTC"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
    (c"lc_monetary", c"C"),
];

/// Pins the settings for the rest of the current transaction (`SET LOCAL`): the committing
/// form, which owns its transactions, calls this after each COMMIT.
pub fn pin_for_transaction() {
    // One statement per transaction (this runs after every batch's COMMIT); the names and
    // values are the constants above.
    let calls: Vec<String> = PINNED
        .iter()
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config('{}'::pg_catalog.text, '{}'::pg_catalog.text, true)",
                name.to_string_lossy(),
                value.to_string_lossy()
            )
        })
        .collect();
    let _ = Spi::run(&format!("SELECT {}", calls.join(", ")));
}

/// The pinned settings' values as the session has them, to give back with `restore_local`.
pub fn session_values() -> Vec<(String, String)> {
    PINNED
        .iter()
        .filter_map(|(name, _)| {
            let name = name.to_str().ok()?;
            let value = crate::pg::gucs::current_setting(name).ok().flatten()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

/// Sets `values` back for the rest of the transaction (a CALL's caller, a DO block say,
/// goes on in it).
pub fn restore_local(values: &[(String, String)]) {
    for (name, value) in values {
        let _ = Spi::run_with_args(
            "SELECT pg_catalog.set_config($1::pg_catalog.text, $2::pg_catalog.text, true)",
            &[name.as_str().into(), value.as_str().into()],
        );
    }
}

/// Pins the settings inside the caller's transaction until `Pinned::release`, the way a
/// function's `SET` clause does (a GUC nest level): released, the caller's values are back
/// exactly; on an error the transaction's abort pops the level the same way.
pub struct Pinned {
    level: i32,
}

impl Pinned {
    pub fn pin() -> Pinned {
        // SAFETY: a new GUC nest level, as fmgr_security_definer makes for a function's SET
        // clause; `release` (or the transaction's abort) pops it.
        let level = unsafe { pg_sys::NewGUCNestLevel() };
        // Each setting saved and changed at that level.
        for (name, value) in PINNED {
            crate::pg::gucs::set_user_setting(name, value, pg_sys::GucAction::GUC_ACTION_SAVE);
        }
        Pinned { level }
    }

    pub fn release(self) {
        // SAFETY: pops exactly the nest level `pin` pushed, restoring the saved values.
        unsafe { pg_sys::AtEOXact_GUC(true, self.level) }
    }
}

/// Runs `work` with the settings pinned, giving the caller's back after it.
pub fn pinned<T>(work: impl FnOnce() -> T) -> T {
    let pin = Pinned::pin();
    let out = work();
    pin.release();
    out
}
