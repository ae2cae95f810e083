//! The browser app, embedded at compile time so that `callisto` is one file.
//!
//! The files under `app/` are served as they are: plain ES modules and CSS,
//! no bundler. Edit them and rebuild; `include_bytes!` picks the change up.

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub bytes: &'static [u8],
    pub content_type: &'static str,
    /// A hash of `bytes`, made by the compiler: the asset's version, for
    /// its ETag.
    pub hash: u64,
}

/// 64-bit FNV-1a: small enough to run at compile time, and any change of
/// an asset changes it (no adversary picks our assets).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! assets {
    ($($path:literal => $mime:literal),* $(,)?) => {
        /// Every embedded file by its URL path.
        pub const ASSETS: &[(&str, Asset)] = &[
            $(($path, Asset {
                bytes: include_bytes!(concat!("../app", $path)),
                content_type: $mime,
                hash: fnv1a(include_bytes!(concat!("../app", $path))),
            }),)*
        ];
    };
}

assets! {
    "/index.html" => "text/html; charset=utf-8",
    "/css/app.css" => "text/css; charset=utf-8",
    "/js/app.js" => "text/javascript; charset=utf-8",
    "/js/signaling.js" => "text/javascript; charset=utf-8",
    "/js/peer.js" => "text/javascript; charset=utf-8",
    "/js/media.js" => "text/javascript; charset=utf-8",
    "/js/ui.js" => "text/javascript; charset=utf-8",
    "/js/chat.js" => "text/javascript; charset=utf-8",
    "/js/files.js" => "text/javascript; charset=utf-8",
    "/js/received.js" => "text/javascript; charset=utf-8",
    "/js/speaking.js" => "text/javascript; charset=utf-8",
    "/js/bitrate.js" => "text/javascript; charset=utf-8",
    "/js/devices.js" => "text/javascript; charset=utf-8",
    "/js/stats.js" => "text/javascript; charset=utf-8",
    "/js/storage.js" => "text/javascript; charset=utf-8",
    "/js/effects.js" => "text/javascript; charset=utf-8",
    "/js/effects-worker.js" => "text/javascript; charset=utf-8",
    "/js/lobby.js" => "text/javascript; charset=utf-8",
    "/favicon.svg" => "image/svg+xml",
}

/// The page every app route (`/`, `/r/<room>`) serves.
pub fn index() -> Asset {
    asset("/index.html").unwrap_or(Asset {
        bytes: b"",
        content_type: "text/html; charset=utf-8",
        hash: fnv1a(b""),
    })
}

/// Looks up an embedded file by its URL path.
pub fn asset(path: &str) -> Option<Asset> {
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_present_and_nonempty() {
        for (path, a) in ASSETS {
            assert!(!a.bytes.is_empty(), "{path} is empty");
        }
        assert!(asset("/js/app.js").is_some());
        assert!(asset("/../Cargo.toml").is_none());
    }

    #[test]
    fn each_asset_has_its_own_hash() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut hashes: Vec<u64> = ASSETS.iter().map(|(_, a)| a.hash).collect();
        for (_, a) in ASSETS {
            assert_eq!(a.hash, fnv1a(a.bytes));
        }
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), ASSETS.len());
    }

    /// A file left out of `assets!`, or a module importing one that is not
    /// there, would otherwise show only in a browser, as a page that stays
    /// on "Loading…".
    #[test]
    fn every_file_of_the_app_is_embedded_and_every_import_is_served() {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let rel = path.strip_prefix(root).unwrap().to_str().unwrap();
                    out.push(format!("/{rel}"));
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("app");
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        for file in &files {
            assert!(
                asset(file).is_some(),
                "{file} is in app/ but not in assets!"
            );
        }
        for (path, a) in ASSETS.iter().filter(|(p, _)| p.ends_with(".js")) {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let module = line
                    .split(" from './")
                    .nth(1)
                    .and_then(|rest| rest.split('\'').next())
                    .unwrap_or_else(|| {
                        panic!("{path}: an import not of the form from './x.js': {line}")
                    });
                assert!(
                    asset(&format!("/js/{module}")).is_some(),
                    "{path} imports {module}, which is not served"
                );
            }
        }
    }

    #[test]
    fn no_inline_script() {
        // The CSP forbids inline script; an inline one would silently not run.
        let html = std::str::from_utf8(index().bytes).unwrap();
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..html[i..].find('>').map_or(html.len(), |e| i + e)];
            assert!(tag.contains("src="), "inline script in index.html: {tag}");
        }
    }
}
