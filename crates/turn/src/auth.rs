//! Credentials: the long-term credential mechanism (RFC 8489 §9.2) with
//! static users, and the TURN REST shared-secret scheme compatible with
//! coturn's `use-auth-secret` (username `"<unix-expiry>:<user>"`, password
//! `base64(HMAC-SHA1(secret, username))`).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine;
use md5::{Digest, Md5};
use ring::hmac;

/// The long-term key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Vec<u8> {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().to_vec()
}

/// The REST-API password for `username` under `secret`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// Time-limited credentials for a browser: `(username, password)` valid
/// until `expires_unix`.
pub fn rest_credentials(secret: &[u8], user: &str, expires_unix: u64) -> (String, String) {
    let username = format!("{expires_unix}:{user}");
    let password = rest_password(secret, &username);
    (username, password)
}

/// The expiry in a REST username: `"<expiry>:<user>"`, as the scheme has
/// it, or `"<user>:<expiry>"`, which coturn also takes (the expiry is the
/// part before the first colon if that is a number, else the part after
/// it), or a bare `"<expiry>"`.
fn rest_expiry(username: &str) -> Option<u64> {
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let expiry = match username.split_once(':') {
        Some((before, _)) if is_number(before) => before,
        Some((_, after)) if is_number(after) => after,
        None if is_number(username) => username,
        _ => return None,
    };
    expiry.parse().ok()
}

/// Where passwords come from.
#[derive(Clone, Default)]
pub struct Credentials {
    realm: String,
    /// Static users: name → long-term key (the password itself is not kept).
    users: HashMap<String, Vec<u8>>,
    /// Shared secrets for the REST scheme, which can change while the
    /// server runs.
    secrets: Secrets,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or secrets.
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// The REST scheme's shared secrets: several, so that a secret can be
/// rotated (the new one signs, the old one is still accepted until the
/// credentials made with it have expired). A handle: its clones share one
/// list, so the list can be changed while the server runs, and the server
/// and whoever hands out credentials see the change at once. A restart to
/// change it would end every relayed call.
#[derive(Clone, Default)]
pub struct Secrets(Arc<RwLock<Vec<Vec<u8>>>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        write!(f, "Secrets({})", self.len())
    }
}

impl Secrets {
    /// Replaces the list; the first signs new credentials.
    pub fn set(&self, secrets: Vec<Vec<u8>>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = secrets;
    }

    /// The secret new credentials are made with: the first.
    pub fn signing(&self) -> Option<Vec<u8>> {
        self.read().first().cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Vec<u8>>> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a username was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownUser,
    Expired,
}

impl Credentials {
    pub fn new(realm: impl Into<String>) -> Self {
        Credentials {
            realm: realm.into(),
            ..Default::default()
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn add_user(&mut self, name: &str, password: &str) {
        let key = long_term_key(name, &self.realm, password);
        self.users.insert(name.to_owned(), key);
    }

    pub fn add_secret(&mut self, secret: &[u8]) {
        self.secrets
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(secret.to_vec());
    }

    /// The shared secrets, to change them while the server runs.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    pub fn has_any(&self) -> bool {
        self.has_users() || !self.secrets.is_empty()
    }

    /// The candidate long-term keys for `username` at `now_unix`: a static
    /// user's key, or one per shared secret for a REST username that has
    /// not expired. Several keys come back only while secrets rotate.
    pub fn keys(&self, username: &str, now_unix: u64) -> Result<Vec<Vec<u8>>, AuthFailure> {
        self.keys_at(username, Some(now_unix))
    }

    /// [`Credentials::keys`] whatever the REST username's expiry: for the
    /// requests on an allocation that credentials made before they
    /// expired.
    pub fn keys_ignoring_expiry(&self, username: &str) -> Result<Vec<Vec<u8>>, AuthFailure> {
        self.keys_at(username, None)
    }

    fn keys_at(&self, username: &str, now_unix: Option<u64>) -> Result<Vec<Vec<u8>>, AuthFailure> {
        if let Some(key) = self.users.get(username) {
            return Ok(vec![key.clone()]);
        }
        let secrets = self.secrets.read();
        if secrets.is_empty() {
            return Err(AuthFailure::UnknownUser);
        }
        let expiry = rest_expiry(username).ok_or(AuthFailure::UnknownUser)?;
        if now_unix.is_some_and(|now| expiry <= now) {
            return Err(AuthFailure::Expired);
        }
        Ok(secrets
            .iter()
            .map(|s| long_term_key(username, &self.realm, &rest_password(s, username)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_scheme_matches_coturn() {
        // coturn's documentation example: secret "north", username "1600000000:alice".
        let p = rest_password(b"north", "1600000000:alice");
        assert_eq!(p.len(), 28, "base64 of a 20-byte HMAC-SHA1");
        let (u, p2) = rest_credentials(b"north", "alice", 1_600_000_000);
        assert_eq!(u, "1600000000:alice");
        assert_eq!(p, p2);
    }

    #[test]
    fn keys_for_users_and_secrets() {
        let mut c = Credentials::new("callisto");
        c.add_user("alice", "wonderland");
        c.add_secret(b"s3cret");
        assert_eq!(
            c.keys("alice", 0).unwrap(),
            vec![long_term_key("alice", "callisto", "wonderland")]
        );
        let (u, p) = rest_credentials(b"s3cret", "bob", 2_000);
        assert_eq!(
            c.keys(&u, 1_000).unwrap(),
            vec![long_term_key(&u, "callisto", &p)]
        );
        assert_eq!(c.keys(&u, 2_000), Err(AuthFailure::Expired));
        assert_eq!(
            c.keys_ignoring_expiry(&u).unwrap(),
            vec![long_term_key(&u, "callisto", &p)]
        );
        assert_eq!(
            c.keys_ignoring_expiry("mallory"),
            Err(AuthFailure::UnknownUser)
        );
        assert_eq!(c.keys("mallory", 0), Err(AuthFailure::UnknownUser));
        assert_eq!(c.keys("12x:bob", 0), Err(AuthFailure::UnknownUser));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_expiry_comes_first_or_last_as_coturn_takes_it() {
        assert_eq!(rest_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice:1700000000"), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000:12"), Some(1_700_000_000));
        assert_eq!(rest_expiry(":1700"), Some(1_700));
        assert_eq!(rest_expiry("1700:"), Some(1_700));
        for none in [
            "alice",
            "alice:bob",
            "17x:alice",
            "alice:17x",
            "",
            ":",
            "a:b:1700",
        ] {
            assert_eq!(rest_expiry(none), None, "{none:?}");
        }
        // Hyphenated and other users with a trailing expiry authenticate.
        let mut c = Credentials::new("callisto");
        c.add_secret(b"s3cret");
        let username = "carol-7:2000";
        let key = long_term_key(username, "callisto", &rest_password(b"s3cret", username));
        assert_eq!(c.keys(username, 1_000).unwrap(), vec![key]);
        assert_eq!(c.keys(username, 2_000), Err(AuthFailure::Expired));
    }

    proptest::proptest! {
        #[test]
        fn any_username_gives_an_expiry_or_none(username in "(?s).{0,60}") {
            let _ = rest_expiry(&username);
        }

        #[test]
        fn the_expiry_reads_back_on_either_side(user in "[^:0-9][^:]{0,20}", expiry in proptest::prelude::any::<u64>()) {
            proptest::prop_assert_eq!(rest_expiry(&format!("{expiry}:{user}")), Some(expiry));
            proptest::prop_assert_eq!(rest_expiry(&format!("{user}:{expiry}")), Some(expiry));
            proptest::prop_assert_eq!(rest_expiry(&user), None);
        }
    }

    /// Rotation: the list changes through any handle, and what the server
    /// accepts and what new credentials are signed with follow at once.
    #[test]
    fn secrets_rotate_through_a_shared_handle() {
        let mut c = Credentials::new("callisto");
        c.add_secret(b"old");
        let handle = c.secrets().clone();
        let server = c.clone();
        let key = |secret: &[u8], now| {
            let (u, p) = rest_credentials(secret, "bob", 2_000);
            (server.keys(&u, now), long_term_key(&u, "callisto", &p))
        };
        let (keys, old_key) = key(b"old", 1_000);
        assert_eq!(keys.unwrap(), vec![old_key.clone()]);
        assert_eq!(handle.signing().as_deref(), Some(&b"old"[..]));

        handle.set(vec![b"new".to_vec(), b"old".to_vec()]);
        assert_eq!(c.secrets().signing().as_deref(), Some(&b"new"[..]));
        let (keys, new_key) = key(b"new", 1_000);
        assert_eq!(keys.unwrap(), vec![new_key.clone(), old_key.clone()]);

        handle.set(vec![b"new".to_vec()]);
        let (keys, _) = key(b"old", 1_000);
        assert_eq!(keys.unwrap(), vec![new_key], "the old one is refused now");
        assert_eq!(format!("{handle:?}"), "Secrets(1)");

        handle.set(Vec::new());
        assert_eq!(key(b"new", 1_000).0, Err(AuthFailure::UnknownUser));
        assert_eq!(handle.signing(), None);
        assert!(!server.has_any());
    }
}
