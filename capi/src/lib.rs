//! The C ABI of ccmgr's service API, declared by `include/ccmgr.h`: `libccmgr_service.so` and
//! `libccmgr_service.a`. Each function is a thin shell over [`ccmgr::service`]; the protocol,
//! its security model and its guarantees are documented there.
//!
//! Every function returns 0 on success and -1 on error (`ccmgr_invoked_with_cc`: 1 or 0), and
//! never unwinds into C: a panic becomes an error. The message of the calling thread's last
//! error is [`ccmgr_last_error`].

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicI32, Ordering};

use ccmgr::service;

thread_local! {
    /// The calling thread's last error message (empty before the first error).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: impl Display) {
    let text = message.to_string().replace('\0', " ");
    let text = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Run `f`, turning an error or a panic into -1 and the thread's last error.
fn guarded(f: impl FnOnce() -> Result<c_int, String>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(rc)) => rc,
        Ok(Err(message)) => {
            set_error(message);
            -1
        }
        Err(_) => {
            set_error("ccmgr: internal error (a panic in the service API)");
            -1
        }
    }
}

/// The C callback and its argument, moved to the API's thread.
struct Callback {
    function: unsafe extern "C" fn(*mut c_void),
    arg: *mut c_void,
}

// SAFETY: `ccmgr.h` documents that the callback is called, with `arg`, on the API's own
// thread; by registering, the C caller promises that this is allowed (whatever `arg` points
// to may be used from that thread). The pointer itself is only carried, never dereferenced
// here.
unsafe impl Send for Callback {}

impl Callback {
    fn call(self) {
        // SAFETY: `function` is the caller's non-null function of this signature (checked in
        // ccmgr_alive), called once, with the argument it gave for it.
        unsafe { (self.function)(self.arg) }
    }
}

/// Register with ccmgr (the "alive" API): see `include/ccmgr.h`.
/// `ccmgr_shutdown_reason`'s answers (`CCMGR_SHUTDOWN_*` in ccmgr.h).
const SHUTDOWN_REQUESTED: c_int = 1;
const SHUTDOWN_COORDINATOR_DIED: c_int = 2;

/// Why the shutdown callback running now was called; 0 outside it. One per process, as
/// `alive` is.
static SHUTDOWN_REASON: AtomicI32 = AtomicI32::new(0);

/// Why the shutdown callback was called: for a C callback, which takes only its `arg`.
#[unsafe(no_mangle)]
pub extern "C" fn ccmgr_shutdown_reason() -> c_int {
    SHUTDOWN_REASON.load(Ordering::SeqCst)
}

#[unsafe(no_mangle)]
pub extern "C" fn ccmgr_alive(
    shutdown_cb: Option<unsafe extern "C" fn(arg: *mut c_void)>,
    arg: *mut c_void,
) -> c_int {
    let callback = shutdown_cb.map(|function| Callback { function, arg });
    guarded(move || {
        let callback =
            callback.ok_or_else(|| "ccmgr_alive: the shutdown callback is NULL".to_owned())?;
        service::alive(move |shutdown| {
            let reason = match shutdown.reason {
                service::ShutdownReason::Requested { .. } => SHUTDOWN_REQUESTED,
                service::ShutdownReason::CoordinatorDied => SHUTDOWN_COORDINATOR_DIED,
            };
            SHUTDOWN_REASON.store(reason, Ordering::SeqCst);
            callback.call();
            SHUTDOWN_REASON.store(0, Ordering::SeqCst);
        })
        .map(|_| 0)
        .map_err(|e| e.to_string())
    })
}

/// Say that initialisation is done (the "ready" API): see `include/ccmgr.h`.
#[unsafe(no_mangle)]
pub extern "C" fn ccmgr_ready() -> c_int {
    guarded(|| service::ready().map(|()| 0).map_err(|e| e.to_string()))
}

/// 1 if `argv[1]` is `-cc`, else 0: see `include/ccmgr.h`.
///
/// # Safety
/// `argv` must be null or point to `argc` valid pointers, each null or to a NUL-terminated
/// string (as `main` receives them).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ccmgr_invoked_with_cc(argc: c_int, argv: *const *const c_char) -> c_int {
    if argc < 2 || argv.is_null() {
        return 0;
    }
    // SAFETY: argc >= 2, so argv[1] is one of the `argc` valid pointers the caller promises.
    let second = unsafe { *argv.add(1) };
    if second.is_null() {
        return 0;
    }
    // SAFETY: a non-null argv entry is a NUL-terminated string that outlives this call.
    let second = unsafe { CStr::from_ptr(second) };
    c_int::from(second.to_bytes() == service::CC_ARG.as_bytes())
}

/// The calling thread's last error message: see `include/ccmgr.h`.
#[unsafe(no_mangle)]
pub extern "C" fn ccmgr_last_error() -> *const c_char {
    // The CString lives in the thread-local until the thread's next failing call replaces it
    // (or the thread ends), which is the lifetime the header promises.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cc_argument() {
        let words: Vec<CString> = ["svc", "-cc", "--x"]
            .iter()
            .map(|w| CString::new(*w).unwrap())
            .collect();
        let argv: Vec<*const c_char> = words.iter().map(|w| w.as_ptr()).collect();
        // SAFETY: argv holds 3 valid C strings.
        assert_eq!(unsafe { ccmgr_invoked_with_cc(3, argv.as_ptr()) }, 1);
        // SAFETY: as above, with fewer entries.
        assert_eq!(unsafe { ccmgr_invoked_with_cc(1, argv.as_ptr()) }, 0);
        // SAFETY: a null argv is allowed.
        assert_eq!(unsafe { ccmgr_invoked_with_cc(2, std::ptr::null()) }, 0);
    }

    #[test]
    fn no_reason_outside_a_callback() {
        assert_eq!(ccmgr_shutdown_reason(), 0);
    }

    #[test]
    fn errors_are_messages() {
        assert_eq!(ccmgr_ready(), -1);
        // SAFETY: the pointer is a valid C string until this thread's next failing call.
        let text = unsafe { CStr::from_ptr(ccmgr_last_error()) };
        assert!(
            text.to_str().unwrap().contains("call alive first"),
            "{text:?}"
        );
        assert_eq!(ccmgr_alive(None, std::ptr::null_mut()), -1);
    }
}
