//! Reading the files that flags name and that SIGHUP has read again (the
//! TURN secrets, the alternate TURN servers): one error shape, naming the
//! flag, the file and what to do; and a warning when a file that holds a
//! secret can be read by every user of the machine.

use std::path::Path;

use anyhow::Context as _;

/// Reads `path`, given with `flag`, and parses it; `hint` says what the
/// file should hold.
pub fn read<T>(
    path: &Path,
    flag: &str,
    hint: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {flag} {} ({hint})", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Runs `read` on a blocking thread, so that a slow filesystem (NFS, a
/// sleeping disk) stalls no task of the runtime while a file is read again.
pub async fn off_the_runtime<T: Send + 'static>(
    read: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(read)
        .await
        .context("the thread reading the file failed")?
}

/// Warns when `path`, which holds a secret (`what`), can be read by every
/// user of the machine. Only a warning: a container may mount it so with
/// nobody else there to read it.
pub fn warn_if_world_readable(path: &Path, what: &str) {
    if world_readable(path) {
        tracing::warn!(
            file = %path.display(),
            "{what} can be read by every user of this machine: chmod o-r {}",
            path.display()
        );
    }
}

fn world_readable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_others_can_read_is_told_from_one_they_cannot() {
        let path = std::env::temp_dir().join(format!("callisto-mode-{}", std::process::id()));
        std::fs::write(&path, "secret").unwrap();
        for (mode, readable) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(world_readable(&path), readable, "{mode:o}");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(!world_readable(&path), "a missing file is nobody's to read");
    }
}
