//! Files saved as they come (`callisto peer --save-files DIR`): each one
//! offered to the peer is written to a new file in the folder, under its
//! (already safe) name, never over another; one that does not come whole
//! is removed. Writes go to the local disk through a buffer, so the
//! driver's task waits on them only for moments.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Tries for a free name: `notes.txt`, `notes (1).txt`, … `notes (999).txt`.
const MAX_TRIES: u32 = 1000;

/// A file being written.
#[derive(Debug)]
pub(crate) struct Saving {
    pub path: PathBuf,
    out: BufWriter<File>,
    written: u64,
}

impl Saving {
    /// A new file for `name` in `dir`: the name itself if free, else the
    /// first free `stem (n).ext`.
    pub fn create(dir: &Path, name: &str) -> std::io::Result<Saving> {
        let (stem, ext) = match name.rfind('.') {
            Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
            _ => (name, ""),
        };
        for n in 0..MAX_TRIES {
            let path = if n == 0 {
                dir.join(name)
            } else {
                dir.join(format!("{stem} ({n}){ext}"))
            };
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(Saving {
                        path,
                        out: BufWriter::with_capacity(1 << 20, file),
                        written: 0,
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            ErrorKind::AlreadyExists,
            format!("{MAX_TRIES} files named like {name} are there already"),
        ))
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Everything is on disk: flushed and synced.
    pub fn finish(mut self) -> std::io::Result<(PathBuf, u64)> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok((self.path, self.written))
    }

    /// Removes what was written of a file that did not come whole.
    pub fn abort(self) {
        let Saving { path, out, .. } = self;
        drop(out);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "could not remove a file that did not come whole: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_taken_gets_a_number_and_a_partial_file_goes() {
        let dir = std::env::temp_dir().join(format!("callisto-saving-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut first = Saving::create(&dir, "notes.txt").unwrap();
        first.write(b"one").unwrap();
        let second = Saving::create(&dir, "notes.txt").unwrap();
        let third = Saving::create(&dir, "notes.txt").unwrap();
        let bare = Saving::create(&dir, ".profile").unwrap();
        assert_eq!(second.path, dir.join("notes (1).txt"));
        assert_eq!(third.path, dir.join("notes (2).txt"));
        assert_eq!(bare.path, dir.join(".profile"));
        assert_eq!(first.finish().unwrap(), (dir.join("notes.txt"), 3));
        assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"one");
        second.abort();
        assert!(!dir.join("notes (1).txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
