//! The file where `callisto serve` keeps its rooms across a restart
//! (`--state-file`): written at shutdown, read back and removed at start.
//! Clients then take their places back with their tokens, as after a
//! dropped connection (callisto_signal::kept). Kept only for
//! `--resume-grace` from the shutdown: older, nobody is waiting for it.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use callisto_signal::KeptRooms;
use serde::{Deserialize, Serialize};

/// The format's version: a file of another is not read.
const VERSION: u32 = 1;
/// A file larger than this is not read: at the default limits (10,000
/// rooms of 16) the rooms take about 3 MiB.
const MAX_FILE_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomsFile {
    version: u32,
    /// When it was written, in seconds since the Unix epoch.
    written_at: u64,
    #[serde(flatten)]
    rooms: KeptRooms,
}

/// `--state-file`, or where systemd gives the service its state
/// (`StateDirectory=`, which sets `state_directory`, `$STATE_DIRECTORY`):
/// `rooms.json` there.
pub fn path(flag: Option<&Path>, state_directory: Option<OsString>) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_owned());
    }
    let dirs = state_directory?;
    // Several StateDirectory= entries come colon-separated: the first.
    let first = std::env::split_paths(&dirs).next()?;
    (!first.as_os_str().is_empty()).then(|| first.join("rooms.json"))
}

/// The rooms kept at `path` by the server before, and how long ago, if
/// there are any younger than `grace`. The file is removed either way:
/// read once. Anything wrong with it is logged, and the server starts
/// with no rooms, as without the file.
pub fn take(path: &Path, grace: Duration) -> Option<(KeptRooms, Duration)> {
    let read = read(path);
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "could not remove the rooms kept from the last run: {e}")
        }
    }
    let file = match read {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(path = %path.display(), "not taking back the rooms kept from the last run: {e:#}");
            return None;
        }
    };
    let now = unix_now();
    // A clock set back a little (NTP) makes a file look newer: it is.
    let age = Duration::from_secs(now.saturating_sub(file.written_at));
    if file.written_at > now + 60 || age >= grace {
        tracing::info!(path = %path.display(), age_secs = age.as_secs(), "the rooms kept from the last run are too old to take back (--resume-grace)");
        return None;
    }
    Some((file.rooms, age))
}

fn read(path: &Path) -> anyhow::Result<RoomsFile> {
    let size = std::fs::metadata(path)?.len();
    anyhow::ensure!(
        size <= MAX_FILE_BYTES,
        "{size} bytes, over the {MAX_FILE_BYTES} a rooms file may have"
    );
    let text = std::fs::read_to_string(path)?;
    let file: RoomsFile = serde_json::from_str(&text).context("not a rooms file")?;
    anyhow::ensure!(
        file.version == VERSION,
        "version {}, not {VERSION}",
        file.version
    );
    Ok(file)
}

/// Writes `rooms` to `path` for the next server, readable by this user
/// only (it names everyone in every room), whole or not at all.
pub fn save(path: &Path, rooms: KeptRooms) -> anyhow::Result<()> {
    let file = RoomsFile {
        version: VERSION,
        written_at: unix_now(),
        rooms,
    };
    let text = serde_json::to_vec(&file)?;
    let tmp = path.with_extension("tmp");
    let mut out = std::fs::OpenOptions::new();
    out.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut out, 0o600);
    let mut out = out
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    out.write_all(&text)?;
    out.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use callisto_signal::kept::{KeptPlace, KeptRoom, token_hash};

    fn rooms() -> KeptRooms {
        KeptRooms {
            rooms: vec![KeptRoom {
                room: "r".into(),
                locked: true,
                open_to_audience: false,
                places: vec![KeptPlace {
                    id: "a".repeat(32),
                    name: "A".into(),
                    watching: false,
                    token_hash: token_hash("t"),
                }],
            }],
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("callisto-rooms-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_rooms_are_taken_back_once() {
        let path = dir("once").join("rooms.json");
        save(&path, rooms()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (got, age) = take(&path, Duration::from_secs(15)).unwrap();
        assert_eq!(got, rooms());
        assert!(age < Duration::from_secs(5));
        assert!(!path.exists(), "removed once read");
        assert!(take(&path, Duration::from_secs(15)).is_none());
    }

    #[test]
    fn a_file_too_old_broken_or_of_another_version_is_not_taken_back_and_removed() {
        let dir = dir("bad");
        let old = dir.join("old.json");
        let stale = RoomsFile {
            version: VERSION,
            written_at: unix_now() - 20,
            rooms: rooms(),
        };
        std::fs::write(&old, serde_json::to_vec(&stale).unwrap()).unwrap();
        assert!(take(&old, Duration::from_secs(15)).is_none());
        let future = dir.join("future.json");
        std::fs::write(
            &future,
            serde_json::to_vec(&RoomsFile {
                written_at: unix_now() + 3600,
                ..stale
            })
            .unwrap(),
        )
        .unwrap();
        assert!(take(&future, Duration::from_secs(15)).is_none());
        for (name, text) in [
            ("junk.json", "{\"version\": 1, \"writtenAt\": "),
            (
                "v2.json",
                "{\"version\": 2, \"writtenAt\": 0, \"rooms\": []}",
            ),
            ("empty.json", ""),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            assert!(take(&path, Duration::from_secs(15)).is_none(), "{name}");
            assert!(!path.exists(), "{name} removed");
        }
        assert!(!old.exists() && !future.exists());
    }

    proptest::proptest! {
        /// Whatever the file holds (bytes, or JSON near the format),
        /// taking it back never panics, and the file is gone after.
        #[test]
        fn any_file_is_taken_back_or_ignored_without_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            near in proptest::prelude::any::<bool>(),
        ) {
            let dir = dir("any");
            let path = dir.join(format!("rooms-{}.json", bytes.len()));
            let text = if near {
                // The format, with what the bytes make of its fields.
                let rooms: String = bytes.iter().map(|b| char::from(b' ' + b % 95)).collect();
                format!(
                    r#"{{"version":1,"writtenAt":{},"rooms":[{{"room":{:?},"locked":true,"places":[{{"id":{:?},"name":{:?},"tokenHash":{:?}}}]}}]}}"#,
                    unix_now(), rooms, rooms, rooms, rooms
                )
                .into_bytes()
            } else {
                bytes.clone()
            };
            std::fs::write(&path, &text).unwrap();
            let _ = take(&path, Duration::from_secs(15));
            proptest::prop_assert!(!path.exists());
        }
    }

    #[test]
    fn the_flag_else_systemds_state_directory_names_the_file() {
        let flag = Some(Path::new("/x/y.json"));
        let systemd = || Some(OsString::from("/var/lib/callisto:/var/lib/other"));
        assert_eq!(path(flag, systemd()), Some(PathBuf::from("/x/y.json")));
        assert_eq!(
            path(None, systemd()),
            Some(PathBuf::from("/var/lib/callisto/rooms.json"))
        );
        assert_eq!(path(None, Some(OsString::new())), None);
        assert_eq!(path(None, None), None);
    }
}
