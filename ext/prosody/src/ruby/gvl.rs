//! Running Rust without the GVL.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use magnus::{Error, Ruby};

struct Call<'a, F, R> {
    f: Option<F>,
    result: Option<std::thread::Result<R>>,
    interrupted: &'a AtomicBool,
}

unsafe extern "C" fn call<F, R>(data: *mut c_void) -> *mut c_void
where
    F: FnOnce(&AtomicBool) -> R,
{
    // SAFETY: `data` is the `Call` that `without_gvl` keeps alive on its stack for this call.
    let call = unsafe { &mut *data.cast::<Call<'_, F, R>>() };
    if let Some(f) = call.f.take() {
        let flag = call.interrupted;
        call.result = Some(catch_unwind(AssertUnwindSafe(|| f(flag))));
    }
    std::ptr::null_mut()
}

/// Only stores to an atomic, so it is async-signal-safe (the flag we pass to `rb_nogvl`).
unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` points to the `AtomicBool` that outlives the `rb_nogvl` call.
    let flag = unsafe { &*data.cast::<AtomicBool>() };
    flag.store(true, Ordering::Release);
}

/// Runs `f` with the GVL released so other Ruby threads keep running.
///
/// `f` receives a flag that turns true when Ruby wants this thread back (a signal,
/// `Thread#raise`, `Timeout`): long waits should poll it and return early. Pending interrupts are
/// then processed as ordinary Ruby exceptions. A panic in `f` becomes a `RuntimeError`; it never
/// unwinds into Ruby.
pub fn without_gvl<F, R>(ruby: &Ruby, f: F) -> Result<R, Error>
where
    F: FnOnce(&AtomicBool) -> R + Send,
    R: Send,
{
    let interrupted = AtomicBool::new(false);
    let mut state = Call {
        f: Some(f),
        result: None,
        interrupted: &interrupted,
    };
    loop {
        // SAFETY: `state` and `interrupted` outlive the call; `call` matches `F`/`R`; with
        // RB_NOGVL_INTR_FAIL Ruby never longjmps out of `rb_nogvl`, and the unblocking function is
        // async-signal-safe as RB_NOGVL_UBF_ASYNC_SAFE promises.
        unsafe {
            rb_sys::rb_nogvl(
                Some(call::<F, R>),
                std::ptr::addr_of_mut!(state).cast(),
                Some(unblock),
                std::ptr::addr_of!(interrupted).cast_mut().cast(),
                (rb_sys::RB_NOGVL_INTR_FAIL | rb_sys::RB_NOGVL_UBF_ASYNC_SAFE) as i32,
            );
        }
        match state.result.take() {
            Some(Ok(value)) => {
                if interrupted.load(Ordering::Acquire) {
                    ruby.thread_check_ints()?;
                }
                return Ok(value);
            }
            Some(Err(panic)) => {
                let what = prosody_core::engine::panic_message(panic.as_ref());
                return Err(Error::new(
                    ruby.exception_runtime_error(),
                    format!("internal error in the Prosody engine: {what}"),
                ));
            }
            // An interrupt was pending before `f` ran: process it (it may raise), then retry.
            None => ruby.thread_check_ints()?,
        }
    }
}
