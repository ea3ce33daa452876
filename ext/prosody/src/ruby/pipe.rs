//! A non-blocking pipe that wakes a Ruby thread waiting with `IO#wait_readable`, which yields to
//! an Async reactor instead of freezing it.

use std::os::fd::RawFd;

/// Read end for Ruby, write end for engine threads.
#[derive(Debug)]
pub struct WakePipe {
    read: RawFd,
    write: RawFd,
}

impl WakePipe {
    /// Opens the pipe with both ends non-blocking and close-on-exec.
    pub fn new() -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors `pipe` writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for fd in fds {
            // SAFETY: `fd` was just opened by `pipe`.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        Ok(Self {
            read: fds[0],
            write: fds[1],
        })
    }

    /// The descriptor Ruby waits on.
    pub fn read_fd(&self) -> RawFd {
        self.read
    }

    /// Makes the read end readable. Never blocks: a full pipe is already readable.
    pub fn wake(&self) {
        let byte = 1u8;
        // SAFETY: writes one byte from a live buffer to our own descriptor.
        unsafe { libc::write(self.write, std::ptr::addr_of!(byte).cast(), 1) };
    }

    /// Empties the pipe so the next `wait_readable` blocks until the next `wake`.
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live buffer of the given length from our own descriptor.
        while unsafe { libc::read(self.read, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

impl Drop for WakePipe {
    fn drop(&mut self) {
        // SAFETY: both descriptors are owned by this value and closed once.
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}
