//! libibverbs, loaded at run time (as NCCL does): a wheel built on a machine without
//! rdma-core still imports everywhere, and a job on a machine without it learns so from
//! `TransportUnavailable` instead of a failed import.
//!
//! Only exported, versioned entry points are looked up here (`dlsym` gives each one's
//! default version); the calls verbs.h inlines through the context's operation table (post,
//! poll) are reached through `abi::context_ops`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

/// Sonames tried in order: the ABI-stable one a runtime package installs, then the
/// development link a `-dev` package adds.
const SONAMES: [&str; 2] = ["libibverbs.so.1", "libibverbs.so"];

/// Opaque libibverbs objects.
pub type Device = c_void;
pub type Context = c_void;

/// Declares the entry points and their loading in one place, so that a name, its type and
/// its lookup cannot drift apart.
macro_rules! entry_points {
    ($($field:ident = $sym:literal : fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The loaded library. It stays loaded for the life of the process (unloading a
        /// verbs provider under live objects is never safe).
        pub struct Library {
            $(pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl Library {
            /// # Safety
            /// `h` is a live dlopen handle of libibverbs.
            unsafe fn resolve(h: *mut c_void) -> Result<Self, String> {
                // SAFETY: each symbol is looked up by its libibverbs name and given the
                // signature verbs.h declares for it.
                unsafe {
                    Ok(Self {
                        $($field: std::mem::transmute::<
                            *mut c_void,
                            unsafe extern "C" fn($($arg),*) $(-> $ret)?,
                        >(symbol(h, $sym)?),)*
                    })
                }
            }
        }
    };
}

entry_points! {
    get_device_list = "ibv_get_device_list": fn(*mut c_int) -> *mut *mut Device;
    free_device_list = "ibv_free_device_list": fn(*mut *mut Device);
    get_device_name = "ibv_get_device_name": fn(*mut Device) -> *const c_char;
    open_device = "ibv_open_device": fn(*mut Device) -> *mut Context;
    close_device = "ibv_close_device": fn(*mut Context) -> c_int;
    // The exported `ibv_query_port` fills `ibv_port_attr` (see `device::port_attr`).
    query_port = "ibv_query_port": fn(*mut Context, u8, *mut c_void) -> c_int;
    query_gid = "ibv_query_gid": fn(*mut Context, u8, c_int, *mut c_void) -> c_int;
    alloc_pd = "ibv_alloc_pd": fn(*mut Context) -> *mut c_void;
    dealloc_pd = "ibv_dealloc_pd": fn(*mut c_void) -> c_int;
    reg_mr = "ibv_reg_mr": fn(*mut c_void, *mut c_void, usize, c_int) -> *mut c_void;
    dereg_mr = "ibv_dereg_mr": fn(*mut c_void) -> c_int;
    create_cq = "ibv_create_cq": fn(*mut Context, c_int, *mut c_void, *mut c_void, c_int) -> *mut c_void;
    destroy_cq = "ibv_destroy_cq": fn(*mut c_void) -> c_int;
    create_srq = "ibv_create_srq": fn(*mut c_void, *mut c_void) -> *mut c_void;
    destroy_srq = "ibv_destroy_srq": fn(*mut c_void) -> c_int;
    create_qp = "ibv_create_qp": fn(*mut c_void, *mut c_void) -> *mut c_void;
    modify_qp = "ibv_modify_qp": fn(*mut c_void, *mut c_void, c_int) -> c_int;
    destroy_qp = "ibv_destroy_qp": fn(*mut c_void) -> c_int;
    get_async_event = "ibv_get_async_event": fn(*mut Context, *mut c_void) -> c_int;
    ack_async_event = "ibv_ack_async_event": fn(*mut c_void);
}

/// Why the last dl* call failed, in words for the user.
fn dlerror_text() -> String {
    // SAFETY: dlerror returns a thread-local string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null dlerror strings are NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// # Safety
/// `h` is a live dlopen handle.
unsafe fn symbol(h: *mut c_void, name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).expect("no NUL in symbol names");
    // SAFETY: as the caller promises.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    if p.is_null() {
        Err(format!("libibverbs has no {name}: {}", dlerror_text()))
    } else {
        Ok(p)
    }
}

impl Library {
    /// libibverbs, loaded on first use; or what is missing (the same answer from then on).
    pub fn get() -> Result<&'static Self, String> {
        static LIB: OnceLock<Result<Library, String>> = OnceLock::new();
        LIB.get_or_init(Self::open).as_ref().map_err(Clone::clone)
    }

    fn open() -> Result<Self, String> {
        let mut tried = Vec::new();
        for name in SONAMES {
            let c = CString::new(name).expect("no NUL in sonames");
            // SAFETY: dlopen with a valid C string; the handle is never closed.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                tried.push(dlerror_text());
                continue;
            }
            // SAFETY: `h` is libibverbs, just opened.
            return unsafe { Self::resolve(h) };
        }
        Err(format!(
            "libibverbs is not installed (rdma-core's libibverbs1 package): {}",
            tried.join("; ")
        ))
    }
}
