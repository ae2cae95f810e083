//! Access codes (`--access-codes-file`): with them, a `join` needs one of
//! the codes (`access-denied` otherwise), so that only the people the
//! operator gave one to can use the server, and the TURN relay whose
//! credentials every `welcome` hands out. Without the flag the server is
//! open to anyone who can reach it, as before.
//!
//! The file is read at start and again on SIGHUP, so that a code can be
//! added, or a leaked one revoked, without a restart; people already in a
//! room stay. It has the secrets files' format (`secrets.rs`): one code
//! per line, blank lines and lines starting with `#` ignored, the
//! whitespace around a code too. Codes never reach the log, only their
//! count.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use callisto_signal::{AccessCheck, Remote};
use callisto_turn::server::FailureLog;
use ring::digest::{SHA256, digest};

const FLAG: &str = "--access-codes-file";
/// Shorter codes get a warning: a guess per join is cheap.
const SHORT_CODE_CHARS: usize = 12;

/// The codes that open the server, kept as SHA-256 digests: compared in
/// full, whatever a guess's length, a refusal takes as long however much
/// of a code a guess got right.
#[derive(Debug, Clone, Default)]
pub struct AccessCodes {
    digests: Arc<RwLock<Vec<[u8; 32]>>>,
}

impl AccessCodes {
    /// Whether `code` is one of the codes.
    pub fn accepts(&self, code: &str) -> bool {
        let given = sha256(code.as_bytes());
        let digests = self.digests.read().unwrap_or_else(|e| e.into_inner());
        // Every code is compared, and every byte of each.
        digests.iter().fold(false, |found, known| {
            let differ = known.iter().zip(&given).fold(0u8, |d, (a, b)| d | (a ^ b));
            found | (differ == 0)
        })
    }

    /// The check a `join` goes through: one of the codes, or a refusal
    /// logged with the client's address and why (never the code: a
    /// mistyped one is close to the real one). Anyone can send refusals
    /// as fast as they like, so their lines are bounded as the TURN
    /// server's authentication failures are, the rest counted.
    pub fn check(&self) -> AccessCheck {
        let codes = self.clone();
        let log = Mutex::new(FailureLog::default());
        Arc::new(move |access: Option<&str>, remote: &Remote, room: &str| {
            if access.is_some_and(|code| codes.accepts(code)) {
                return true;
            }
            let admitted = log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(Instant::now());
            if let Some(left_out) = admitted {
                let why = if access.is_some() {
                    "not an access code of this server"
                } else {
                    "no access code"
                };
                // The address first, alone: fail2ban's filter
                // (contrib/fail2ban/filter.d/callisto-access.conf) reads it.
                tracing::warn!(client = %remote.ip(), %remote, room, left_out, "join refused: {why}");
            }
            false
        })
    }

    /// How many codes there are.
    pub fn len(&self) -> usize {
        self.digests.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there are none (never, once read: a file without one is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(&self, codes: &[Vec<u8>]) {
        let digests = codes.iter().map(|c| sha256(c)).collect();
        *self.digests.write().unwrap_or_else(|e| e.into_inner()) = digests;
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The codes in `text`, in order, or why there are none.
pub fn parse(text: &str) -> Result<Vec<Vec<u8>>, String> {
    crate::secrets::parse(text).map_err(|_| "holds no access code: write one per line".into())
}

fn read(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    crate::flag_files::warn_if_world_readable(path, FLAG);
    let codes = crate::flag_files::read(path, FLAG, "one access code per line", parse)?;
    let short = codes
        .iter()
        .filter(|c| String::from_utf8_lossy(c).chars().count() < SHORT_CODE_CHARS)
        .count();
    if short > 0 {
        tracing::warn!(
            file = %path.display(),
            short,
            "{FLAG}: {short} code(s) shorter than {SHORT_CODE_CHARS} characters are easy to guess: use 16 or more random ones (openssl rand -base64 18)"
        );
    }
    Ok(codes)
}

/// Reads the codes from `path`, and again on every SIGHUP. A file that
/// cannot be read, or holds no code, fails the start, and later changes
/// nothing (logged).
pub fn load(path: PathBuf, health: &crate::health::Health) -> anyhow::Result<AccessCodes> {
    let codes = AccessCodes::default();
    codes.set(&read(&path)?);
    tracing::info!(file = %path.display(), count = codes.len(), "{FLAG}: joining a room needs one of its access codes");
    let reloaded = codes.clone();
    let file = path.clone();
    crate::flag_files::reread_on_hangup(
        path,
        read,
        move |read| {
            let result = match read {
                Ok(list) => {
                    reloaded.set(&list);
                    tracing::info!(file = %file.display(), count = list.len(), "{FLAG}: access codes replaced");
                    "replaced"
                }
                Err(e) => {
                    tracing::error!(
                        count = reloaded.len(),
                        "{FLAG}: access codes unchanged: {e:#}"
                    );
                    "failed"
                }
            };
            metrics::counter!("callisto_access_code_reloads_total", "result" => result)
                .increment(1);
        },
        health,
        "the --access-codes-file re-reader",
    )?;
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codes(list: &[&str]) -> AccessCodes {
        let codes = AccessCodes::default();
        codes.set(
            &list
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect::<Vec<_>>(),
        );
        codes
    }

    #[test]
    fn only_the_codes_open() {
        let open = codes(&["correct horse battery", "Ünïcode ☎ code"]);
        assert!(open.accepts("correct horse battery"));
        assert!(open.accepts("Ünïcode ☎ code"));
        for wrong in [
            "",
            "correct horse batter",
            "correct horse battery ",
            "CORRECT HORSE BATTERY",
            "x",
        ] {
            assert!(!open.accepts(wrong), "{wrong:?}");
        }
        assert!(!AccessCodes::default().accepts("anything"));
    }

    #[test]
    fn a_file_without_a_code_says_so() {
        assert_eq!(
            parse("# code of the team\n team-code-1 \n\n"),
            Ok(vec![b"team-code-1".to_vec()])
        );
        assert!(
            parse("# none yet\n\n")
                .unwrap_err()
                .contains("no access code")
        );
    }

    proptest! {
        #[test]
        fn a_code_opens_and_nothing_else_does(
            list in prop::collection::vec("[!-~]{1,40}", 1..5),
            guess in "\\PC{0,40}",
        ) {
            let refs: Vec<&str> = list.iter().map(String::as_str).collect();
            let open = codes(&refs);
            for code in &list {
                prop_assert!(open.accepts(code));
            }
            prop_assert_eq!(open.accepts(&guess), list.contains(&guess));
        }
    }
}
