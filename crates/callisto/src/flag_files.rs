//! Reading the files that flags name and that SIGHUP has read again (the
//! TURN secrets, the alternate TURN servers): one error shape, naming the
//! flag, the file and what to do.

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
