//! Crash injection for the kill tests: `FERROTUNE_KILL_AT=NAME[:N]` makes the process SIGKILL
//! itself the N-th time (default the first) it reaches the point NAME, so a test can kill a
//! run exactly inside a checkpoint write or the final export instead of hoping a timer lands
//! there. Unset (always, outside tests), a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Points: `step` (gradients formed, optimizer not yet stepped), `checkpoint` (inside a
/// checkpoint write, adapter written but not the optimizer state), `adapter` (inside the final
/// adapter's write, weights written but not its config).
pub fn hit(name: &str) {
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("FERROTUNE_KILL_AT").ok()?;
        let (n, k) = v.split_once(':').map_or((v.as_str(), 1), |(n, k)| (n, k.parse().unwrap_or(1)));
        Some((n.to_string(), k))
    });
    if let Some((point, nth)) = target {
        if point == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
            // SAFETY: sending a signal to ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
