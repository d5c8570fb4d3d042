//! The output directory of a training run: one run at a time (a lock file), no leftovers of
//! interrupted writes, and no new run silently written over an earlier one.

use crate::error::{Error, Result};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".ferrotune.lock";
pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The training and evaluation losses against the step, drawn from the metrics.
pub const LOSS_PLOT: &str = "loss.png";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const ADAPTER_DIR: &str = "adapter";
/// DPO's reference log-probabilities, computed once per run (see `objectives::dpo`).
pub const REFERENCE_LOGPS_FILE: &str = "reference_logps.json";

/// Held while a run writes into its output directory. The kernel releases the underlying
/// `flock` when the process dies however it dies (kill -9 included), so a lock can only be
/// stale in the sense that its file is still there; the next run takes it over.
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

/// Who holds (or last held) a lock: written into the lock file for the messages.
fn owner_line() -> String {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("pid={} host={} started_unix={started}\n", std::process::id(), hostname())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

fn describe_owner(line: &str) -> String {
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("?").to_string();
    format!("PID {} on host {}", field("pid="), field("host="))
}

impl RunLock {
    /// Takes the lock of `output_dir` (creating the folder), or says who holds it. Returns the
    /// lock and, when an earlier run died holding it, a line saying that it was taken over.
    pub fn acquire(output_dir: &Path) -> Result<(RunLock, Option<String>)> {
        std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
        let path = output_dir.join(LOCK_FILE);
        // A run that releases the lock removes the file; if that happens between our open and
        // our flock we hold a lock on a file nobody else can see, so check and retry.
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::Training(format!(
                    "{} is in use by another ferrotune run ({}; lock file {}). Wait for it to finish, or choose another output_dir",
                    output_dir.display(),
                    describe_owner(&holder),
                    path.display()
                )));
            }
            if !same_file(&file, &path) {
                continue;
            }
            let mut previous = String::new();
            let _ = file.read_to_string(&mut previous);
            let takeover = (!previous.trim().is_empty()).then(|| {
                format!("note: took over the lock of an earlier run that is no longer running ({}): it was interrupted", describe_owner(&previous))
            });
            let write = |f: &mut std::fs::File| -> std::io::Result<()> {
                f.set_len(0)?;
                f.rewind()?;
                f.write_all(owner_line().as_bytes())
            };
            write(&mut file).map_err(|e| Error::io(&path, e))?;
            return Ok((RunLock { file, path }, takeover));
        }
        Err(Error::Training(format!("{}: could not take the run lock (it kept changing hands)", path.display())))
    }
}

fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, so a run that opens it after this sees
        // either our lock or no file (and `acquire`'s inode check catches the rest).
        let _ = std::fs::remove_file(&self.path);
        // SAFETY: unlocking a descriptor we own; closing it would release the lock as well.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Removes what interrupted writes left in the run's folders; returns the removed paths.
pub fn remove_leftovers(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [output_dir.to_path_buf(), output_dir.join(CHECKPOINTS_DIR), output_dir.join(ADAPTER_DIR)] {
        removed.extend(crate::io_util::remove_leftover_temps(&dir)?.into_iter().map(|n| dir.join(n)));
    }
    Ok(removed)
}

/// The artefacts of an earlier run found in `output_dir`, as paths relative to it.
pub fn previous_run(output_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for f in [RUN_FILE, METRICS_FILE, LOSS_PLOT, REFERENCE_LOGPS_FILE] {
        if output_dir.join(f).exists() {
            found.push(f.to_string());
        }
    }
    found.extend(checkpoint_dirs(output_dir).into_iter().map(|(step, _)| format!("{CHECKPOINTS_DIR}/step-{step}")));
    let adapter = output_dir.join(ADAPTER_DIR);
    if own_adapter_files(&adapter).next().is_some() {
        found.push(format!("{ADAPTER_DIR}/"));
    }
    found
}

/// `checkpoints/step-N` folders, sorted by step.
pub fn checkpoint_dirs(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn own_adapter_files(adapter_dir: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    [crate::methods::lora::ADAPTER_CONFIG, crate::methods::lora::ADAPTER_WEIGHTS]
        .into_iter()
        .map(|f| adapter_dir.join(f))
        .filter(|p| p.exists())
}

/// Refuses to start a new run over an earlier one unless the user said which they want.
pub fn check_fresh_start(output_dir: &Path, found: &[String]) -> Result<()> {
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Training(format!(
        "{} already holds a run ({}). Refusing to start a new run over it: pass --resume to continue that run, \
         --overwrite to start again (its checkpoints, metrics and adapter are removed; other files are kept), \
         or choose another output_dir",
        output_dir.display(),
        found.join(", ")
    )))
}

/// `--overwrite`: removes the earlier run's own files (checkpoints, metrics, run.json and the
/// adapter's two files) so nothing of it can be mistaken for the new run's; leaves the rest.
pub fn remove_previous_run(output_dir: &Path) -> Result<()> {
    for (_, dir) in checkpoint_dirs(output_dir) {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let adapter = output_dir.join(ADAPTER_DIR);
    let files: Vec<PathBuf> = [output_dir.join(RUN_FILE), output_dir.join(METRICS_FILE), output_dir.join(LOSS_PLOT), output_dir.join(REFERENCE_LOGPS_FILE)]
        .into_iter()
        .filter(|p| p.exists())
        .chain(own_adapter_files(&adapter))
        .collect();
    for f in files {
        std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_a_released_one_is_free() {
        let d = tempfile::tempdir().unwrap();
        let (lock, takeover) = RunLock::acquire(d.path()).unwrap();
        assert!(takeover.is_none());
        let err = RunLock::acquire(d.path()).err().expect("held").to_string();
        assert!(err.contains("in use by another ferrotune run") && err.contains(&std::process::id().to_string()), "{err}");
        drop(lock);
        assert!(!d.path().join(LOCK_FILE).exists());
        let (_lock, takeover) = RunLock::acquire(d.path()).unwrap();
        assert!(takeover.is_none(), "a cleanly released lock leaves nothing to take over");
    }

    #[test]
    fn a_dead_owners_lock_is_taken_over_with_a_message() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LOCK_FILE), "pid=999999 host=elsewhere started_unix=1\n").unwrap();
        let (_lock, takeover) = RunLock::acquire(d.path()).unwrap();
        let msg = takeover.expect("a message");
        assert!(msg.contains("999999") && msg.contains("elsewhere"), "{msg}");
    }

    #[test]
    fn previous_runs_are_found_and_overwrite_removes_only_their_files() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        assert!(previous_run(out).is_empty());
        std::fs::create_dir_all(out.join("checkpoints/step-3")).unwrap();
        std::fs::create_dir_all(out.join("adapter")).unwrap();
        std::fs::write(out.join("adapter/adapter_config.json"), "{}").unwrap();
        std::fs::write(out.join("adapter/README.md"), "mine").unwrap();
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let found = previous_run(out);
        assert_eq!(found, ["metrics.jsonl", "checkpoints/step-3", "adapter/"]);
        let err = check_fresh_start(out, &found).unwrap_err().to_string();
        assert!(err.contains("--resume") && err.contains("--overwrite") && err.contains("checkpoints/step-3"), "{err}");
        remove_previous_run(out).unwrap();
        assert!(previous_run(out).is_empty());
        assert!(out.join("notes.txt").is_file() && out.join("adapter/README.md").is_file());
    }
}
