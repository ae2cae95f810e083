//! TURN shared secrets from a file, read at start and again on SIGHUP,
//! so that a secret can be rotated, or a leaked one revoked, without a
//! restart (which would end every relayed call): `--turn-secrets-file`,
//! the built-in TURN server's, and `--ice-secrets-file`, that of a TURN
//! server of the operator's own (coturn) whose credentials `serve` hands
//! out.
//!
//! The file holds one secret per line; blank lines and lines starting with
//! `#` are ignored, and so is the whitespace around a secret (a `#` inside
//! one is part of it). The first signs the credentials `serve` hands out;
//! every one is accepted (by the built-in server). Secrets never reach the
//! log, only their count.

use std::path::{Path, PathBuf};

use callisto_turn::auth::Secrets;

/// Which file: the flag that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretsFile {
    /// `--turn-secrets-file`.
    Turn,
    /// `--ice-secrets-file`.
    Ice,
}

impl SecretsFile {
    fn flag(self) -> &'static str {
        match self {
            SecretsFile::Turn => "--turn-secrets-file",
            SecretsFile::Ice => "--ice-secrets-file",
        }
    }

    /// The task that re-reads it, for `/healthz`.
    fn rereader(self) -> &'static str {
        match self {
            SecretsFile::Turn => "the --turn-secrets-file re-reader",
            SecretsFile::Ice => "the --ice-secrets-file re-reader",
        }
    }
}

/// The secrets in the file; fails with what to fix.
pub fn read(path: &Path, which: SecretsFile) -> anyhow::Result<Vec<Vec<u8>>> {
    crate::flag_files::warn_if_world_readable(path, which.flag());
    crate::flag_files::read(path, which.flag(), "one secret per line", parse)
}

/// The secrets in `text`, in order, or why there are none.
pub fn parse(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let secrets: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if secrets.is_empty() {
        return Err("holds no secret: write one per line".into());
    }
    Ok(secrets)
}

/// Re-reads `path` into `secrets` on every SIGHUP, and calls
/// `new_signer` when the first secret, which signs new credentials, has
/// changed. A file that cannot be read, or holds no secret, is logged and
/// changes nothing.
pub fn reload_on_hangup(
    path: PathBuf,
    which: SecretsFile,
    secrets: Secrets,
    new_signer: impl Fn() + Send + 'static,
    health: &crate::health::Health,
) -> anyhow::Result<()> {
    let file = path.clone();
    let flag = which.flag();
    let read = match which {
        SecretsFile::Turn => |path: &Path| read(path, SecretsFile::Turn),
        SecretsFile::Ice => |path: &Path| read(path, SecretsFile::Ice),
    };
    crate::flag_files::reread_on_hangup(
        path,
        read,
        move |read| {
            let result = match read {
                Ok(list) => {
                    let count = list.len();
                    let signer_changed = secrets.signing().as_ref() != list.first();
                    secrets.set(list);
                    if signer_changed {
                        new_signer();
                    }
                    tracing::info!(
                        file = %file.display(),
                        count,
                        "{flag}: TURN shared secrets replaced; the first signs new credentials"
                    );
                    "replaced"
                }
                Err(e) => {
                    tracing::error!(
                        count = secrets.len(),
                        "{flag}: TURN shared secrets unchanged: {e:#}"
                    );
                    "failed"
                }
            };
            metrics::counter!(
                "callisto_turn_secret_reloads_total",
                "file" => flag.trim_start_matches('-'),
                "result" => result
            )
            .increment(1);
        },
        health,
        which.rereader(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_secret_per_line_with_comments() {
        let text = "# rotated on 2026-11-27\n  new-secret \n\nold#secret\r\n# gone: older\n";
        assert_eq!(
            parse(text),
            Ok(vec![b"new-secret".to_vec(), b"old#secret".to_vec()])
        );
        for none in ["", "\n\n", "# only a comment\n", "   \t\n"] {
            assert!(parse(none).unwrap_err().contains("no secret"), "{none:?}");
        }
    }

    proptest! {
        #[test]
        fn any_text_gives_its_secrets_or_says_there_are_none(text in "(?s).{0,400}") {
            match parse(&text) {
                Ok(secrets) => {
                    prop_assert!(!secrets.is_empty());
                    for s in &secrets {
                        let s = std::str::from_utf8(s).unwrap();
                        prop_assert!(!s.is_empty() && s.trim() == s && !s.starts_with('#'));
                        prop_assert!(text.contains(s));
                    }
                }
                Err(e) => prop_assert!(e.contains("no secret")),
            }
        }

        #[test]
        fn written_secrets_read_back(
            secrets in prop::collection::vec("[!-~&&[^#]][!-~]{0,40}", 1..6),
        ) {
            let mut text = String::from("# secrets\n");
            for s in &secrets {
                text.push_str(&format!("  {s}\t\r\n\n"));
            }
            let expected: Vec<Vec<u8>> = secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
            prop_assert_eq!(parse(&text), Ok(expected));
        }
    }
}
