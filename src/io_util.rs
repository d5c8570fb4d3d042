//! Atomic file writes: nothing a user wrote or trained is left half-written.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` by writing a sibling temp file, syncing it and renaming it over
/// `path`, so a crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the contents streamed by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    remove_dead_writers_temps(path);
    let tmp = temp_sibling(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Creates or replaces the directory `dir`, which this program owns whole (a checkpoint), by
/// filling a sibling temporary directory with `fill` and swapping it into place, so readers
/// never see a half-written checkpoint. A failed `fill` leaves the previous `dir` untouched,
/// and a crash at any instant leaves either the old or the new directory under `dir`.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = filled_temp_dir(dir, fill)?;
    if !dir.exists() {
        return std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e));
    }
    if exchange(&tmp, dir).is_err() {
        // No atomic exchange on this filesystem: move the old one aside first, so a crash
        // between the two renames still leaves it on disk (under its temporary name).
        let old = temp_dir_name(dir, "old");
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    // `tmp` now holds the previous contents.
    std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))
}

/// Writes the files `fill` produces into `dir`, which may hold other files of the user's:
/// a new `dir` appears whole (one rename); into an existing one each produced file replaces
/// its namesake atomically and nothing else in the folder is touched. Callers decide before
/// calling whether an existing `dir` may be written into (see [`check_output_dir`]).
pub fn write_files_into(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = filled_temp_dir(dir, fill)?;
    if !dir.exists() {
        return std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e));
    }
    let entries = std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&tmp, e))?;
        let target = dir.join(entry.file_name());
        if target.is_dir() {
            return Err(Error::format(&target, "is a folder, where this export writes a file of that name; nothing was replaced by it"));
        }
        std::fs::rename(entry.path(), &target).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))
}

/// A fresh temporary directory beside `dir` (same filesystem, so renames are atomic), filled
/// by `fill`; removed again if `fill` fails.
fn filled_temp_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    remove_dead_writers_temps(dir);
    let tmp = temp_dir_name(dir, "partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// `.NAME.KIND-PID` beside `path`: hidden, recognisable as ours by [`is_leftover_temp`].
fn temp_dir_name(path: &Path, kind: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    parent_of(path).join(format!(".{name}.{kind}-{}", std::process::id()))
}

/// Whether a directory entry's name is one of the temporary names this module creates
/// (`.X.tmp-PID`, `.X.partial-PID`, `.X.old-PID`): what an interrupted write leaves behind.
pub fn is_leftover_temp(name: &str) -> bool {
    parse_temp_name(name).is_some()
}

/// `.X.KIND-PID` → (`X`, PID) for our temporary kinds.
fn parse_temp_name(entry: &str) -> Option<(&str, u32)> {
    let (name, tail) = entry.strip_prefix('.')?.rsplit_once('.')?;
    let (kind, pid) = tail.split_once('-')?;
    let valid = !name.is_empty() && ["tmp", "partial", "old"].contains(&kind) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| Some((name, pid.parse().ok()?))).flatten()
}

/// Removes the temporaries that writers of `path` which are no longer running left beside it
/// (a killed export's half-written `.model.gguf.tmp-PID`, say). A live writer's are kept, so
/// this is safe without a lock; failures only leave litter, so they are ignored.
fn remove_dead_writers_temps(path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    let Ok(entries) = std::fs::read_dir(parent_of(path)) else { return };
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&entry_name, &name) else { continue };
        if pid != std::process::id() && !process_alive(pid) {
            let p = entry.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// The writer's PID if `entry` is one of our temporaries for a file called `name`.
fn leftover_pid(entry: &str, name: &str) -> Option<u32> {
    parse_temp_name(entry).filter(|(n, _)| *n == name).map(|(_, pid)| pid)
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists (EPERM means it does).
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Removes the leftovers of interrupted writes directly inside `dir`; returns their names.
/// Only call this while holding the folder's run lock: a live writer's temporaries look the same.
pub fn remove_leftover_temps(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_leftover_temp(&name) {
            continue;
        }
        let path = entry.path();
        let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        r.map_err(|e| Error::io(&path, e))?;
        removed.push(name);
    }
    Ok(removed)
}

/// Swaps two directory entries in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// What an export or run may find at its output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// The output is a folder of files (PEFT adapter, HF model directory).
    Dir,
    /// The output is one file (a GGUF).
    File,
}

/// Refuses to write where something of the user's would be replaced, unless `overwrite`:
/// a non-empty folder (for folder outputs) or an existing file (for file outputs). A file
/// where a folder is expected, or the reverse, is refused even with `overwrite`.
pub fn check_output_path(out: &Path, kind: OutputKind, overwrite: bool) -> Result<()> {
    let Ok(meta) = std::fs::metadata(out) else { return Ok(()) };
    match kind {
        OutputKind::Dir if !meta.is_dir() => Err(Error::format(out, "exists and is not a folder; this output is a folder (choose another --out)")),
        OutputKind::File if meta.is_dir() => Err(Error::format(out, "is a folder; this output is one file (give a file path such as model.gguf)")),
        OutputKind::Dir => {
            let names = visible_entries(out)?;
            if names.is_empty() || overwrite {
                return Ok(());
            }
            let shown = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
            let more = if names.len() > 4 { format!(", … ({} in all)", names.len()) } else { String::new() };
            Err(Error::format(
                out,
                format!("already exists and is not empty ({shown}{more}); refusing to write into it. Pass --overwrite to replace this export's own files there (other files are kept), or choose another --out"),
            ))
        }
        OutputKind::File if overwrite => Ok(()),
        OutputKind::File => Err(Error::format(out, "already exists; refusing to replace it. Pass --overwrite to replace it, or choose another --out")),
    }
}

/// The names in `dir`, sorted, not counting our own leftover temporaries.
fn visible_entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_leftover_temp(n))
        .collect();
    names.sort();
    Ok(names)
}

/// An f32 setting as JSON with the shortest decimal that reads back as it (0.05, not the
/// 0.05000000074505806 that widening to f64 writes), so files show what the user wrote.
pub fn f32_json(x: f32) -> serde_json::Value {
    let shortest: f64 = format!("{x}").parse().expect("an f32's Display is a decimal");
    serde_json::json!(shortest)
}

#[cfg(test)]
mod tests {
    #[test]
    fn f32_settings_are_written_as_their_shortest_decimal() {
        assert_eq!(super::f32_json(0.05).to_string(), "0.05");
        assert_eq!(super::f32_json(1e-4).to_string(), "0.0001");
        assert_eq!(super::f32_json(0.05).as_f64().unwrap() as f32, 0.05f32);
    }

    use super::*;

    #[test]
    fn leftover_names_are_recognised() {
        for n in [".adapter.partial-123", ".metrics.jsonl.tmp-9", ".step-3.old-77"] {
            assert!(is_leftover_temp(n), "{n}");
        }
        for n in ["adapter", ".hidden", ".x.tmp-", ".x.tmp-12a", "a.tmp-12", ".tmp-12", ".x.partial"] {
            assert!(!is_leftover_temp(n), "{n}");
        }
    }

    #[test]
    fn a_dead_writers_temporaries_are_removed_a_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m.gguf");
        // PID 0x7fff_fff0 is beyond any pid_max, so certainly not running.
        let dead = d.path().join(format!(".m.gguf.tmp-{}", 0x7fff_fff0u32));
        let live = d.path().join(".m.gguf.tmp-1"); // init: always running
        let other = d.path().join(format!(".other.gguf.tmp-{}", 0x7fff_fff0u32));
        for p in [&dead, &live, &other] {
            std::fs::write(p, "x").unwrap();
        }
        write_atomic(&out, b"new").unwrap();
        assert!(!dead.exists() && live.exists() && other.exists());
        assert_eq!(leftover_pid(".adapter.partial-12", "adapter"), Some(12));
        assert_eq!(leftover_pid(".adapter2.partial-12", "adapter"), None);
    }

    #[test]
    fn files_into_keeps_the_users_other_files() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        std::fs::write(out.join("a.bin"), "old").unwrap();
        assert!(check_output_path(&out, OutputKind::Dir, false).is_err());
        check_output_path(&out, OutputKind::Dir, true).unwrap();
        write_files_into(&out, |tmp| {
            std::fs::write(tmp.join("a.bin"), "new").unwrap();
            std::fs::write(tmp.join("b.bin"), "new").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
        assert!(out.join("sub").is_dir());
        assert_eq!(std::fs::read_to_string(out.join("a.bin")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(out.join("b.bin")).unwrap(), "new");
        assert!(remove_leftover_temps(d.path()).unwrap().is_empty(), "no temporary left behind");
    }

    #[test]
    fn dir_atomic_replaces_and_failed_fill_keeps_the_old() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("step-1");
        write_dir_atomic(&ck, |t| std::fs::write(t.join("x"), "1").map_err(|e| Error::io(t, e))).unwrap();
        write_dir_atomic(&ck, |t| std::fs::write(t.join("y"), "2").map_err(|e| Error::io(t, e))).unwrap();
        assert!(!ck.join("x").exists() && ck.join("y").is_file());
        let r = write_dir_atomic(&ck, |_| Err(Error::Training("boom".into())));
        assert!(r.is_err() && ck.join("y").is_file());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "only step-1 remains");
    }

    #[test]
    fn file_outputs_are_not_replaced_without_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("m.gguf");
        check_output_path(&f, OutputKind::File, false).unwrap();
        std::fs::write(&f, "x").unwrap();
        assert!(check_output_path(&f, OutputKind::File, false).unwrap_err().to_string().contains("--overwrite"));
        check_output_path(&f, OutputKind::File, true).unwrap();
        assert!(check_output_path(d.path(), OutputKind::File, true).is_err(), "a folder is never a file output");
        assert!(check_output_path(&f, OutputKind::Dir, true).is_err(), "a file is never a folder output");
    }
}
