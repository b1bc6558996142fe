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
