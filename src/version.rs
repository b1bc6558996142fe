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
