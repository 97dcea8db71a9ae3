//! Writing secret files (KEKs, tokens, keys) so that a crash, a power cut, a concurrent
//! writer or a planted symlink can neither leave a torn or world-readable secret nor
//! redirect the write somewhere else.
//!
//! Both functions first write the whole secret to a fresh temporary file in the target's
//! directory: created exclusively (`O_CREAT|O_EXCL`, plus `O_NOFOLLOW` on Linux) with mode
//! 0600 from the start, so it is never readable by others even for an instant, then
//! fsynced. Only then does the file get its final name, and the directory is fsynced so
//! the name survives a power cut too. Readers therefore see either the old complete file
//! or the new complete file, never a partial one. A failure removes the temporary file.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `O_NOFOLLOW` for `OpenOptionsExt::custom_flags`, without a libc dependency. Its value
/// differs between Linux architectures (it is 0o400000 on x86 but 0o100000 on ARM and
/// PowerPC), hence one constant per architecture family. Elsewhere it is 0: `O_EXCL`
/// with `O_CREAT` already refuses to open through a symlink at the final component, so
/// the flag only hardens what exclusive creation guarantees anyway.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "riscv64",
        target_arch = "s390x",
        target_arch = "loongarch64"
    )
))]
const O_NOFOLLOW: i32 = 0o400_000;
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    )
))]
const O_NOFOLLOW: i32 = 0o100_000;
#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "riscv64",
        target_arch = "s390x",
        target_arch = "loongarch64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    )
)))]
const O_NOFOLLOW: i32 = 0;

/// How often a temporary name is re-drawn if it is taken (64 random bits: only an
/// attacker pre-creating names could make this matter).
const TEMP_ATTEMPTS: usize = 8;

/// Replaces (or creates) `path` with `bytes`, atomically and durably, mode 0600.
///
/// Refuses if `path` is a symlink: a secret must live where the configuration says, not
/// wherever a link points. The parent directory must exist. Concurrent writers do not
/// interfere: each uses its own temporary file and the last rename wins whole.
pub fn write_secret_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    refuse_symlink(path)?;
    let tmp = TempSecret::write(path, bytes)?;
    std::fs::rename(&tmp.path, path)
        .with_context(|| format!("replacing secret file {}", path.display()))?;
    tmp.disarm();
    sync_parent(path)
}

/// Creates `path` with `bytes` only if nothing exists at that name: `Ok(true)` if this
/// call created it, `Ok(false)` if a file was already there (it is left untouched).
///
/// For secrets that must never be overwritten, such as a generated KEK: when several
/// processes race, exactly one wins and the others get `Ok(false)` and read the winner's
/// file. The complete temporary file is given its final name with `link(2)`, which fails
/// if the name exists, so the name only ever appears with its full content (exclusive
/// creation of the final name itself would expose an empty file to a racing reader, and
/// `renameat2(RENAME_NOREPLACE)` is not reachable from std). Needs a filesystem with hard
/// links, which every local Linux filesystem has.
pub fn create_secret_exclusive(path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
    refuse_symlink(path)?;
    let tmp = TempSecret::write(path, bytes)?;
    let created = match std::fs::hard_link(&tmp.path, path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(e).with_context(|| format!("creating secret file {}", path.display()));
        }
    };
    // Dropping the guard unlinks the temporary name; the secret stays under `path`.
    drop(tmp);
    if created {
        sync_parent(path)?;
    }
    Ok(created)
}

fn refuse_symlink(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            anyhow::bail!(
                "refusing to write secret file {}: it is a symlink",
                path.display()
            )
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs the directory holding `path`, so a rename or link into it is durable.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// A fully written, fsynced temporary file next to the target. Removed on drop unless
/// disarmed (i.e. renamed into place).
struct TempSecret {
    path: PathBuf,
    armed: bool,
}

impl TempSecret {
    fn write(target: &Path, bytes: &[u8]) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{} names no file", target.display()))?
            .to_string_lossy()
            .into_owned();
        let dir = parent_dir(target);
        let mut last_err = None;
        for _ in 0..TEMP_ATTEMPTS {
            let mut rnd = [0_u8; 8];
            aws_lc_rs::rand::fill(&mut rnd)
                .map_err(|_| anyhow::anyhow!("random generator failed"))?;
            let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
            let path = dir.join(format!(".{name}.tmp-{suffix}"));
            match open_exclusive(&path) {
                Ok(mut f) => {
                    // Armed before the first write: from here on, failure removes it.
                    let tmp = Self { path, armed: true };
                    f.write_all(bytes)
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("writing {}", tmp.path.display()))?;
                    return Ok(tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating a temporary file in {}", dir.display())
                    });
                }
            }
        }
        Err(anyhow::anyhow!(
            "creating a temporary file in {}: {}",
            dir.display(),
            last_err.map_or_else(|| "no attempt".to_owned(), |e| e.to_string())
        ))
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempSecret {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn open_exclusive(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    // create_new is O_CREAT|O_EXCL.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600).custom_flags(O_NOFOLLOW);
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Names in `dir` other than `keep`.
    fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !keep.contains(&n.as_str()))
            .collect()
    }

    #[test]
    fn writes_content_private_from_creation_and_replaces_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        write_secret_atomic(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert_eq!(mode(&p), 0o600);

        // A pre-existing readable file is replaced by a private one.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(mode(&p), 0o600);
        assert!(others(dir.path(), &["token"]).is_empty(), "no temp files");
    }

    #[test]
    fn symlink_targets_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"untouched").unwrap();
        let link = dir.path().join("secret");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();

        let err = write_secret_atomic(&link, b"x").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        let err = create_secret_exclusive(&link, b"x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
        // Also a dangling link: nothing is created where it points.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_secret_atomic(&dangling, b"x").is_err());
        assert!(!dir.path().join("nowhere").exists());

        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(
            others(dir.path(), &["elsewhere", "secret", "dangling"]).is_empty(),
            "no temp files"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory at the target name: the rename fails after the temp file is written.
        let p = dir.path().join("occupied");
        std::fs::create_dir(&p).unwrap();
        assert!(write_secret_atomic(&p, b"x").is_err());
        assert!(p.is_dir());
        assert!(others(dir.path(), &["occupied"]).is_empty(), "temp removed");
        // A missing directory: an error, nothing created.
        let missing = dir.path().join("no/such/dir/key");
        assert!(write_secret_atomic(&missing, b"x").is_err());
        assert!(create_secret_exclusive(&missing, b"x").is_err());
        assert!(others(dir.path(), &["occupied"]).is_empty());
    }

    #[test]
    fn concurrent_writers_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shared");
        let contents: Vec<Vec<u8>> = (0..8_u8).map(|i| vec![b'a' + i; 64 * 1024]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..5 {
                        write_secret_atomic(p, c).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(contents.contains(&got), "one writer's complete content");
        assert_eq!(mode(&p), 0o600);
        assert!(others(dir.path(), &["shared"]).is_empty(), "no temp files");
    }

    #[test]
    fn exclusive_creation_never_overwrites_and_one_racer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        assert!(create_secret_exclusive(&p, b"one").unwrap());
        assert!(!create_secret_exclusive(&p, b"two").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"one", "never overwritten");
        assert_eq!(mode(&p), 0o600);

        let raced = dir.path().join("raced");
        let wins: Vec<(u8, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8_u8)
                .map(|i| {
                    let raced = &raced;
                    s.spawn(move || (i, create_secret_exclusive(raced, &[i; 32]).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<u8> = wins.iter().filter(|(_, w)| *w).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 1, "exactly one creator: {wins:?}");
        assert_eq!(std::fs::read(&raced).unwrap(), vec![winners[0]; 32]);
        assert!(
            others(dir.path(), &["kek", "raced"]).is_empty(),
            "no temp files"
        );
    }
}
