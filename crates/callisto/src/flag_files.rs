//! Reading the files that flags name and that SIGHUP has read again (the
//! TURN secrets, the alternate TURN servers): one error shape, naming the
//! flag, the file and what to do; and a warning when a file that holds a
//! secret can be read by every user of the machine.

use std::path::{Path, PathBuf};

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

/// Reads `path` again with `read` on every SIGHUP and hands `apply` what
/// came of it. The read runs on a blocking thread, so that a slow
/// filesystem (NFS, a sleeping disk) stalls no task of the runtime.
pub fn reread_on_hangup<T: Send + 'static>(
    path: PathBuf,
    read: fn(&Path) -> anyhow::Result<T>,
    mut apply: impl FnMut(anyhow::Result<T>) + Send + 'static,
    health: &crate::health::Health,
    what: &'static str,
) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    health.spawn_vital(what, async move {
        while hangups.recv().await.is_some() {
            let file = path.clone();
            let read = tokio::task::spawn_blocking(move || read(&file)).await;
            apply(
                read.context("the thread reading the file failed")
                    .and_then(|r| r),
            );
        }
    });
    Ok(())
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
