//! A one-shot readiness signal for a fiber waiting with `IO#wait_readable` on any reactor (the
//! application's own `Async` blocks included), set from an engine thread.

use std::os::fd::RawFd;

/// An eventfd, non-blocking and close-on-exec; readable once signalled.
#[derive(Debug)]
pub struct EventFd {
    fd: RawFd,
}

impl EventFd {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The descriptor Ruby waits on.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Makes the descriptor readable. Never blocks.
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor.
        unsafe { libc::write(self.fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe { libc::close(self.fd) };
    }
}
