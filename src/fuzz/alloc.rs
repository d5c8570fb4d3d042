//! A global allocator wrapper that lets the fuzz driver see allocations sized by untrusted
//! lengths. A binary that wants the check installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: ferrotune::fuzz::alloc::TrackingAlloc = ferrotune::fuzz::alloc::TrackingAlloc;
//! ```
//!
//! Two guards:
//! - per case, the largest single request made *on the case's thread* is recorded, and the
//!   driver fails the case when it exceeds a bound derived from the input size;
//! - any request above [`HARD_LIMIT`] on any thread is refused after printing the target and
//!   case that made it (the process then aborts in `handle_alloc_error`), so that a length of
//!   2^40 can neither take the machine's memory nor go unreported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Requests above this many bytes are refused outright (no parser input we fuzz is larger than
/// a few MiB, so nothing legitimate comes near it).
pub const HARD_LIMIT: usize = 1 << 31;

static INSTALLED: AtomicBool = AtomicBool::new(false);
thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// The target and case running on this thread (for the message printed when the hard
    /// limit is hit).
    static CURRENT: Cell<(&'static str, u64)> = const { Cell::new(("-", u64::MAX)) };
}

/// [`System`] plus the bookkeeping described in the module docs.
pub struct TrackingAlloc;

impl TrackingAlloc {
    #[inline]
    fn note(size: usize) -> bool {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        // `try_with` because the allocator runs during thread teardown too.
        let _ = PEAK.try_with(|p| {
            if size > p.get() {
                p.set(size)
            }
        });
        if size > HARD_LIMIT {
            report_refused(size);
            return false;
        }
        true
    }
}

/// Writes straight to stderr: formatting through `eprintln!` could allocate.
fn report_refused(size: usize) {
    let mut buf = [0u8; 200];
    let mut w = Writer { buf: &mut buf, len: 0 };
    let (target, case) = CURRENT.try_with(Cell::get).unwrap_or(("-", u64::MAX));
    let _ = std::fmt::write(
        &mut w,
        format_args!("\nfuzz: refused an allocation of {size} bytes in target `{target}` case {case}\n"),
    );
    let len = w.len;
    // SAFETY: writing a valid buffer to fd 2.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
}

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer, which
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::note(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Whether [`TrackingAlloc`] is the global allocator of this process (it has seen a request).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Starts a case on this thread: clears the peak and records the case index.
pub(crate) fn begin_case(target: &'static str, case: u64) {
    CURRENT.with(|c| c.set((target, case)));
    PEAK.with(|p| p.set(0));
}

/// The largest single request made on this thread since [`begin_case`].
pub(crate) fn peak() -> usize {
    PEAK.with(Cell::get)
}
