//! What differs between the PostgreSQL majors this extension builds for, in one place.

use pgrx::pg_sys;

/// Marks the COPY range table entry as needing INSERT, where each major keeps that.
///
/// # Safety
/// `item` must come from `addRangeTableEntryForRelation` on `pstate`.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
pub unsafe fn require_insert(_pstate: *mut pg_sys::ParseState, item: *mut pg_sys::ParseNamespaceItem) {
    // SAFETY: the caller passes a live namespace item whose RTE was just made.
    unsafe { (*(*item).p_rte).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode };
}

/// From 16 on the permission lives in the item's `RTEPermissionInfo`.
///
/// # Safety
/// `item` must come from `addRangeTableEntryForRelation` on `pstate`.
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
pub unsafe fn require_insert(_pstate: *mut pg_sys::ParseState, item: *mut pg_sys::ParseNamespaceItem) {
    // SAFETY: the caller passes a live namespace item with its permission info.
    unsafe { (*(*item).p_perminfo).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode };
}

/// The major this build is for (int8in's syntax, for one, differs from 16 on).
pub fn major() -> u32 {
    pg_sys::PG_VERSION_NUM / 10000
}

/// Every GUC variable this backend knows, placeholders for custom settings included, in the
/// GUC table's order (by name). 16 changed the call to return a sorted copy and its length.
pub fn guc_variables() -> Vec<*mut pg_sys::config_generic> {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    // SAFETY: the backend's own GUC table and its length, read without changing either.
    let (vars, n) = unsafe { (pg_sys::get_guc_variables(), pg_sys::GetNumConfigOptions()) };
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    let (vars, n) = {
        let mut n = 0;
        // SAFETY: returns a palloc'd array of `n` pointers into the backend's GUC table.
        (unsafe { pg_sys::get_guc_variables(&mut n) }, n)
    };
    // SAFETY: `vars` holds `n` valid pointers (both calls above say so).
    (0..n.max(0) as usize).map(|i| unsafe { *vars.add(i) }).collect()
}

/// The characters of a raw parse tree's String node: 15 gave it its own struct, 14 keeps it in
/// a `Value` union.
///
/// # Safety
/// `node` must be a live node tagged `T_String`.
pub unsafe fn string_node_chars(node: *mut pg_sys::Node) -> *const std::ffi::c_char {
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    // SAFETY: the caller says `node` is a String node, which 14 allocates as a `Value`.
    unsafe {
        (*(node as *mut pg_sys::Value)).val.str_
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    // SAFETY: the caller says `node` is a String node.
    unsafe {
        (*(node as *mut pg_sys::String)).sval
    }
}

/// From 17 a background worker may connect as a role without LOGIN (the CALL already acts as
/// that role); before, it cannot, and the CALL says so instead of starting workers that fail.
pub const WORKERS_MAY_BE_NOLOGIN: bool = cfg!(any(feature = "pg17", feature = "pg18"));

/// The flags a worker connects with: from 17, the role's NOLOGIN is not checked (see above).
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
pub const WORKER_CONNECT_FLAGS: u32 = 0;
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub const WORKER_CONNECT_FLAGS: u32 = pg_sys::BGWORKER_BYPASS_ROLELOGINCHECK;

/// Installs a SIGTERM handler in a background worker (18 renamed the backend's `pqsignal`).
///
/// # Safety
/// Only in a background worker, before it unblocks signals.
pub unsafe fn on_sigterm(handler: unsafe extern "C-unwind" fn(i32)) {
    // SAFETY: the caller is a worker installing its handler, as PostgreSQL's own workers do.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(handler));
    }
}

/// Reserves the `chat_backfill.` prefix: any other name in it is a typo. From 15 the server
/// refuses such names from then on (42602); 14 can only warn of the ones already set.
pub fn reserve_guc_prefix(prefix: &std::ffi::CStr) {
    // SAFETY: called from _PG_init, with a NUL-terminated prefix, as extensions do.
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(prefix.as_ptr())
    };
    // SAFETY: as above.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(prefix.as_ptr())
    };
}
