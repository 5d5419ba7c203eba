//! libibverbs, loaded at run time (as NCCL does): a wheel built on a machine without
//! rdma-core still imports everywhere, and a job on a machine without it learns so from
//! `TransportUnavailable` instead of a failed import.
//!
//! Only the exported, versioned entry points are used here; the calls that rdma-core
//! inlines through the context's operation table (post, poll) belong to the data path.

use std::ffi::{CStr, CString, c_char, c_int, c_void};

/// Sonames tried in order: the ABI-stable one a runtime package installs, then the
/// development link a `-dev` package adds.
const SONAMES: [&str; 2] = ["libibverbs.so.1", "libibverbs.so"];

/// Opaque libibverbs objects.
pub type Device = c_void;
pub type Context = c_void;

type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut Device;
type FreeDeviceList = unsafe extern "C" fn(*mut *mut Device);
type GetDeviceName = unsafe extern "C" fn(*mut Device) -> *const c_char;
type OpenDevice = unsafe extern "C" fn(*mut Device) -> *mut Context;
type CloseDevice = unsafe extern "C" fn(*mut Context) -> c_int;
type QueryPort = unsafe extern "C" fn(*mut Context, u8, *mut c_void) -> c_int;

/// The loaded library and the entry points device discovery needs. It stays loaded for the
/// life of the process (unloading a verbs provider under live objects is never safe).
pub struct Library {
    pub get_device_list: GetDeviceList,
    pub free_device_list: FreeDeviceList,
    pub get_device_name: GetDeviceName,
    pub open_device: OpenDevice,
    pub close_device: CloseDevice,
    /// The exported `ibv_query_port`, which fills the port attributes up to `link_layer`
    /// (see `device::port_attr`).
    pub query_port: QueryPort,
}

/// Why libibverbs could not be loaded, in words for the user.
pub fn dlerror_text() -> String {
    // SAFETY: dlerror returns a thread-local string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null dlerror strings are NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Library {
    /// Loads libibverbs, or says what is missing.
    pub fn open() -> Result<Self, String> {
        let mut tried = Vec::new();
        for name in SONAMES {
            let c = CString::new(name).expect("no NUL in sonames");
            // SAFETY: dlopen with a valid C string; the handle is never closed.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                tried.push(dlerror_text());
                continue;
            }
            // SAFETY: each symbol is looked up by its libibverbs name and cast to the
            // signature verbs.h declares for it.
            unsafe {
                return Ok(Self {
                    get_device_list: std::mem::transmute::<*mut c_void, GetDeviceList>(symbol(
                        h,
                        "ibv_get_device_list",
                    )?),
                    free_device_list: std::mem::transmute::<*mut c_void, FreeDeviceList>(symbol(
                        h,
                        "ibv_free_device_list",
                    )?),
                    get_device_name: std::mem::transmute::<*mut c_void, GetDeviceName>(symbol(
                        h,
                        "ibv_get_device_name",
                    )?),
                    open_device: std::mem::transmute::<*mut c_void, OpenDevice>(symbol(
                        h,
                        "ibv_open_device",
                    )?),
                    close_device: std::mem::transmute::<*mut c_void, CloseDevice>(symbol(
                        h,
                        "ibv_close_device",
                    )?),
                    query_port: std::mem::transmute::<*mut c_void, QueryPort>(symbol(
                        h,
                        "ibv_query_port",
                    )?),
                });
            }
        }
        Err(format!(
            "libibverbs is not installed (rdma-core's libibverbs1 package): {}",
            tried.join("; ")
        ))
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
