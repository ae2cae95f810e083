//! TLS for the web server and TURN: certificates from PEM files or
//! generated at start, replaced while the server runs when the files change
//! (a renewal), and a listener that does handshakes off the accept path so
//! that one slow or silent client cannot stall everyone else's connections,
//! and hands TURN over TLS on the same port to the TURN server.

pub mod validity;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use callisto_turn::net::StreamConnections;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::connections::{FirstByteBack, Guarded, LimitedListener};
use validity::{ExpiryWarnings, Standing, Validity, rfc3339};

/// Why TLS could not be set up; every variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error(
        "the key in {key} is not the certificate's in {cert}: give the key the certificate was issued for"
    )]
    KeyMismatch { cert: String, key: String },
    #[error(
        "the certificate in {path} expired at {}, and clients refuse it: the one served, valid until {}, stays",
        rfc3339(*not_after),
        rfc3339(*served_until)
    )]
    Expired {
        path: String,
        not_after: i64,
        served_until: i64,
    },
    #[error("the certificate and key do not form a usable TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("generating a self-signed certificate for {names:?}: {source}")]
    Generate {
        names: Vec<String>,
        source: rcgen::Error,
    },
}

/// A ready server configuration, and the certificate it hands out.
pub struct TlsSetup {
    pub config: Arc<rustls::ServerConfig>,
    pub certificate: Arc<Certificate>,
}

/// The TLS setup the `--tls-*` flags ask for, if any.
pub fn from_args(args: &crate::cli::TlsArgs) -> Result<Option<TlsSetup>, TlsError> {
    if args.tls_self_signed {
        Ok(Some(self_signed(&args.tls_names)?))
    } else if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        Ok(Some(from_pem_files(cert, key)?))
    } else {
        Ok(None)
    }
}

/// Loads a certificate chain and key from PEM files, which
/// [`Certificate::reload`] reads again later.
pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsSetup, TlsError> {
    let files = PemFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    let provider = provider();
    let loaded = files.load(&provider)?;
    build(provider, loaded, Some(files))
}

/// Generates a self-signed certificate for `names` (DNS names or IPs).
pub fn self_signed(names: &[String]) -> Result<TlsSetup, TlsError> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|source| {
        TlsError::Generate {
            names: names.to_vec(),
            source,
        }
    })?;
    let cert = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let provider = provider();
    let loaded = Loaded::new(CertifiedKey::from_der(vec![cert], key, &provider)?);
    build(provider, loaded, None)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(
    provider: Arc<CryptoProvider>,
    loaded: Loaded,
    files: Option<PemFiles>,
) -> Result<TlsSetup, TlsError> {
    let certificate = Arc::new(Certificate {
        current: RwLock::new(loaded),
        files,
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate.clone());
    // The same configuration serves TURN over TLS, whose clients may offer
    // "stun.turn" alone (RFC 7443): without it in the list, the handshake
    // of such a client would fail for want of a common protocol.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"stun.turn".to_vec()];
    Ok(TlsSetup {
        config: Arc::new(config),
        certificate,
    })
}

/// The certificate every handshake gets, web and TURN alike. One read from
/// PEM files can be replaced while the server runs: certificates are
/// renewed every few weeks, and a restart to pick the new one up would end
/// every call. Handshakes from then on get the new certificate; connections
/// already open keep the one they started with.
#[derive(Debug)]
pub struct Certificate {
    current: RwLock<Loaded>,
    files: Option<PemFiles>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: String,
    /// `None` if the dates cannot be read (then logged, and not watched).
    validity: Option<Validity>,
}

impl Loaded {
    fn new(key: CertifiedKey) -> Loaded {
        let leaf = key.cert.first();
        let fingerprint = leaf.map(fingerprint).unwrap_or_default();
        let validity = leaf.map(|c| Validity::of_der(c.as_ref()));
        let validity = match validity {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                tracing::warn!(sha256 = %fingerprint, "cannot read the TLS certificate's validity dates, so its expiry is not watched: {e}");
                None
            }
            None => None,
        };
        Loaded {
            key: Arc::new(key),
            fingerprint,
            validity,
        }
    }
}

/// Where a certificate chain and its key are read from.
#[derive(Debug, Clone)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`Certificate::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold the certificate already served (or there are no files).
    Unchanged,
    /// From now on handshakes get this one, by its SHA-256 fingerprint.
    Replaced { fingerprint: String },
}

impl PemFiles {
    fn load(&self, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        crate::flag_files::warn_if_world_readable(&self.key, "the TLS private key (--tls-key)");
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.display().to_string(),
            });
        }
        let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or_else(|| TlsError::NoKey {
                path: self.key.display().to_string(),
            })?;
        match CertifiedKey::from_der(chain, key_der, provider) {
            Ok(key) => Ok(Loaded::new(key)),
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(TlsError::KeyMismatch {
                    cert: self.cert.display().to_string(),
                    key: self.key.display().to_string(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What identifies both files' current contents without reading them:
    /// a renewal writes new files or renames new ones into place, and
    /// either changes this. `None` for a file that cannot be looked at.
    fn stamp(&self) -> [Option<FileStamp>; 2] {
        [FileStamp::of(&self.cert), FileStamp::of(&self.key)]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        // Follows symbolic links, so that certbot's live/ links, which
        // change their targets on renewal, are seen to change.
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

impl Certificate {
    /// The SHA-256 fingerprint of the certificate served now.
    pub fn fingerprint(&self) -> String {
        self.loaded().fingerprint
    }

    /// The PEM files it is read from, unless it was generated at start.
    pub fn files(&self) -> Option<&PemFiles> {
        self.files.as_ref()
    }

    fn loaded(&self) -> Loaded {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the PEM files again. A certificate that is the same as the one
    /// served changes nothing; one that cannot be used (unreadable, not PEM,
    /// a key of another certificate: a renewal half written) is an error,
    /// and the one served stays.
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let Some(files) = &self.files else {
            return Ok(Reloaded::Unchanged);
        };
        let loaded = files.load(&self.provider)?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.key.cert == loaded.key.cert {
            return Ok(Reloaded::Unchanged);
        }
        // Never a certificate that works for one that clients refuse (an old
        // file copied back, a renewal that went wrong).
        let now = unix_now();
        if let (Some(new), Some(served)) = (loaded.validity, current.validity)
            && new.standing(now) == Standing::Expired
            && served.standing(now) != Standing::Expired
        {
            return Err(TlsError::Expired {
                path: files.cert.display().to_string(),
                not_after: new.not_after,
                served_until: served.not_after,
            });
        }
        let fingerprint = loaded.fingerprint.clone();
        publish_expiry(loaded.validity);
        *current = loaded;
        Ok(Reloaded::Replaced { fingerprint })
    }

    /// The validity period of the certificate served now, if readable.
    pub fn validity(&self) -> Option<Validity> {
        self.loaded().validity
    }

    /// [`Certificate::reload`], with the outcome counted, then logged.
    fn reload_and_log(&self, why: &str) {
        let Some(files) = &self.files else { return };
        let outcome = self.reload();
        let result = match &outcome {
            Ok(Reloaded::Replaced { .. }) => "replaced",
            Ok(Reloaded::Unchanged) => "unchanged",
            Err(_) => "failed",
        };
        metrics::counter!("callisto_tls_certificate_reloads_total", "result" => result)
            .increment(1);
        match outcome {
            Ok(Reloaded::Replaced { fingerprint }) => {
                tracing::info!(
                    cert = %files.cert.display(),
                    sha256 = %fingerprint,
                    valid_until = %self.validity().map(|v| rfc3339(v.not_after)).unwrap_or_default(),
                    why,
                    "TLS certificate replaced: new connections get it"
                );
            }
            Ok(Reloaded::Unchanged) => {
                tracing::debug!(cert = %files.cert.display(), why, "TLS certificate unchanged");
            }
            Err(e) => tracing::error!(
                why,
                sha256 = %self.fingerprint(),
                "TLS certificate kept, its files cannot be used: {e}"
            ),
        }
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // The key alone, once per handshake: not the fingerprint's copy.
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Some(current.key.clone())
    }
}

/// Keeps a certificate fresh until `stop`. One read from files is read
/// again on every SIGHUP, and whenever they are seen to change (looked at
/// every `recheck`, if given). Any certificate's expiry is exported and
/// watched ([`watch_expiry`]).
pub fn keep_fresh(
    certificate: Arc<Certificate>,
    recheck: Option<Duration>,
    stop: CancellationToken,
    health: &crate::health::Health,
) -> anyhow::Result<()> {
    if let Some(v) = certificate.validity() {
        tracing::info!(
            sha256 = %certificate.fingerprint(),
            valid_from = %rfc3339(v.not_before),
            valid_until = %rfc3339(v.not_after),
            "serving a TLS certificate"
        );
    }
    health.spawn_vital(
        "the certificate expiry watch",
        watch_expiry(certificate.clone(), stop.clone()),
    );
    let Some(files) = certificate.files().cloned() else {
        return Ok(());
    };
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    health.spawn_vital("the certificate reloader", async move {
        let mut recheck = recheck.map(|every| {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut seen = files.stamp();
        loop {
            let tick = async {
                match recheck.as_mut() {
                    Some(interval) => {
                        interval.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = hangups.recv() => "SIGHUP",
                () = tick => "the files changed",
            };
            // Off the runtime's threads, as every file read here: a slow
            // filesystem must stall no connection.
            let stamped = files.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || stamped.stamp()).await else {
                continue;
            };
            if why != "SIGHUP" && now == seen {
                continue;
            }
            seen = now;
            let certificate = certificate.clone();
            let _ = tokio::task::spawn_blocking(move || certificate.reload_and_log(why)).await;
        }
    });
    Ok(())
}

/// How often the served certificate's dates are looked at: warnings come
/// days ahead, so an hour late is soon enough.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

/// Exports the served certificate's expiry as a gauge, and warns in the log
/// when its renewal is overdue, when it has expired or is not yet valid
/// (then once a day), until `stop`.
async fn watch_expiry(certificate: Arc<Certificate>, stop: CancellationToken) {
    let mut warnings = ExpiryWarnings::default();
    let mut interval = tokio::time::interval(EXPIRY_CHECK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(v) = certificate.validity() else {
            continue;
        };
        publish_expiry(Some(v));
        let now = unix_now();
        let (from, until) = (rfc3339(v.not_before), rfc3339(v.not_after));
        let sha256 = certificate.fingerprint();
        let days_left = (v.not_after - now) / 86_400;
        match warnings.check(v, now) {
            None | Some(Standing::Valid) => {}
            Some(Standing::RenewalOverdue) => tracing::warn!(
                %sha256, valid_until = %until, days_left,
                "the TLS certificate should have been renewed by now: check the renewal (certbot renew --dry-run), or clients will refuse it when it expires"
            ),
            Some(Standing::Expired) => tracing::error!(
                %sha256, valid_until = %until,
                "the TLS certificate has expired: browsers refuse the web app and TURN over TLS until it is renewed"
            ),
            Some(Standing::NotYetValid) => tracing::error!(
                %sha256, valid_from = %from,
                "the TLS certificate is not valid yet: clients refuse it until then (is this machine's clock right?)"
            ),
        }
    }
}

/// The gauge alerts are written on: the served certificate's expiry, in
/// Unix seconds, as blackbox exporter's `probe_ssl_earliest_cert_expiry`.
fn publish_expiry(validity: Option<Validity>) {
    if let Some(v) = validity {
        metrics::gauge!("callisto_tls_certificate_expiry_timestamp_seconds")
            .set(v.not_after as f64);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// SHA-256 of the DER certificate, as colon-separated upper-case hex, the
/// way browsers display it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that yields TLS streams whose handshake is
/// done; with TURN beside it, those whose first bytes are TURN's (a STUN
/// message: first byte below 0x40, where every HTTP request starts with a
/// letter) go to TURN instead, so that browsers that may only reach this
/// port get TURN over TLS through it.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(WebStream, SocketAddr)>,
}

/// What the web server reads: the TLS stream, its first byte given back.
pub type WebStream = FirstByteBack<TlsStream<Guarded<TcpStream>>>;

impl TlsListener {
    /// Does the handshakes of `tcp`'s connections, which hold their places
    /// in its limits from the first byte, and waits up to
    /// `first_byte_timeout` for what follows; hands TURN's to `turn`.
    pub fn new(
        mut tcp: LimitedListener,
        config: Arc<rustls::ServerConfig>,
        first_byte_timeout: Duration,
        turn: Option<StreamConnections>,
    ) -> io::Result<Self> {
        let local = axum::serve::Listener::local_addr(&tcp)?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = tcp.accept().await;
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let turn = turn.clone();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    // As long as a request head may take: a browser may
                    // open a connection ahead of its first request, and a
                    // TURN client sends its first request at once.
                    let first = tokio::time::timeout(first_byte_timeout, FirstByteBack::read(tls));
                    let (first, mut stream) = match first.await {
                        Ok(Some(read)) => read,
                        Ok(None) => return,
                        Err(_) => {
                            crate::connections::count_timeout("idle");
                            return;
                        }
                    };
                    match turn {
                        Some(turn) if first < 0x40 => {
                            // Its allocation's lifetime bounds a TURN
                            // client's silence, not the web's idle limit.
                            stream.get_mut().get_mut().0.wait_for_the_client();
                            turn.serve_tls(stream, addr, local).await;
                        }
                        _ => {
                            let _ = tx.send((stream, addr)).await;
                        }
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = WebStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(setup: &TlsSetup) -> CertificateDer<'static> {
        setup.certificate.loaded().key.cert[0].clone()
    }

    /// A fresh self-signed pair as PEM: (certificate, key).
    fn pem_pair(name: &str) -> (String, String) {
        let generated = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
        (generated.cert.pem(), generated.signing_key.serialize_pem())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("callisto-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn self_signed_has_a_fingerprint() {
        let setup = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let fp = setup.certificate.fingerprint();
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.split(':').all(|h| h.len() == 2));
        assert_eq!(fp, fingerprint(&served(&setup)));
        assert_eq!(setup.certificate.reload().unwrap(), Reloaded::Unchanged);
    }

    #[test]
    fn pem_files_round_trip_and_errors_name_the_file() {
        let dir = temp_dir("tls");
        let (cert_pem, key_pem) = pem_pair("example.test");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        assert!(from_pem_files(&cert, &key).is_ok());

        let err = from_pem_files(&key, &key).err().unwrap();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = from_pem_files(&cert, &cert).err().unwrap();
        assert!(err.to_string().contains("cert.pem"), "{err}");
        let err = from_pem_files(&dir.join("missing.pem"), &key)
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let (_, other_key) = pem_pair("example.test");
        std::fs::write(&key, other_key).unwrap();
        let err = from_pem_files(&cert, &key).err().unwrap();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("key.pem"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A renewal is served from the next handshake on; files that cannot
    /// be used (half written, or the key of another certificate) leave the
    /// certificate served as it was.
    #[test]
    fn a_renewed_certificate_replaces_the_served_one_and_a_broken_one_does_not() {
        let dir = temp_dir("tls-reload");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let (first_cert, first_key) = pem_pair("example.test");
        std::fs::write(&cert, &first_cert).unwrap();
        std::fs::write(&key, &first_key).unwrap();
        let setup = from_pem_files(&cert, &key).unwrap();
        let first = served(&setup);
        assert_eq!(setup.certificate.reload().unwrap(), Reloaded::Unchanged);

        let (second_cert, second_key) = pem_pair("example.test");
        std::fs::write(&cert, &second_cert).unwrap();
        let err = setup.certificate.reload().unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert_eq!(served(&setup), first, "half a renewal changes nothing");

        std::fs::write(&key, &second_key).unwrap();
        let Reloaded::Replaced { fingerprint: fp } = setup.certificate.reload().unwrap() else {
            panic!("the renewal is taken")
        };
        let second = served(&setup);
        assert_ne!(second, first);
        assert_eq!(fp, fingerprint(&second));
        assert_eq!(setup.certificate.fingerprint(), fp);

        for (broken_cert, broken_key) in [
            ("", second_key.as_str()),
            (&second_cert[..second_cert.len() / 2], second_key.as_str()),
            (second_cert.as_str(), "-----BEGIN PRIVATE KEY-----\nAAAA\n"),
        ] {
            std::fs::write(&cert, broken_cert).unwrap();
            std::fs::write(&key, broken_key).unwrap();
            assert!(setup.certificate.reload().is_err());
            assert_eq!(served(&setup), second);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            setup.certificate.reload(),
            Err(TlsError::Read { .. })
        ));
        assert_eq!(served(&setup), second);
    }

    /// A self-signed pair as PEM, valid over `[from, until]` (Unix seconds).
    fn pem_pair_valid(from: i64, until: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = validity::test_certificate(&key, from, until);
        (cert.pem(), key.serialize_pem())
    }

    /// An expired certificate does not replace one that works (an old file
    /// copied back); it is served when there is nothing better, and its
    /// dates are known either way.
    #[test]
    fn an_expired_certificate_does_not_replace_a_valid_one() {
        let dir = temp_dir("tls-expired");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let now = unix_now();
        let write = |(c, k): (String, String)| {
            std::fs::write(&cert, c).unwrap();
            std::fs::write(&key, k).unwrap();
        };
        let (expired_from, expired_until) = (now - 100 * 86_400, now - 10 * 86_400);
        write(pem_pair_valid(expired_from, expired_until));
        let setup = from_pem_files(&cert, &key).unwrap();
        assert_eq!(
            setup.certificate.validity(),
            Some(Validity {
                not_before: expired_from,
                not_after: expired_until
            })
        );

        let until = now + 80 * 86_400;
        write(pem_pair_valid(now - 10 * 86_400, until));
        assert!(matches!(
            setup.certificate.reload(),
            Ok(Reloaded::Replaced { .. })
        ));
        assert_eq!(setup.certificate.validity().unwrap().not_after, until);
        let working = served(&setup);

        write(pem_pair_valid(expired_from, expired_until));
        let err = setup.certificate.reload().unwrap_err();
        assert!(matches!(err, TlsError::Expired { .. }), "{err}");
        let said = err.to_string();
        assert!(
            said.contains("cert.pem") && said.contains(&validity::rfc3339(expired_until)),
            "{said}"
        );
        assert_eq!(served(&setup), working);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_file_stamp_changes_with_a_rewrite_or_a_rename_into_place() {
        let dir = temp_dir("tls-stamp");
        let files = PemFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        assert_eq!(files.stamp(), [None, None]);
        std::fs::write(&files.cert, "a").unwrap();
        std::fs::write(&files.key, "b").unwrap();
        let first = files.stamp();
        assert!(first.iter().all(Option::is_some));
        assert_eq!(files.stamp(), first);
        std::fs::write(&files.cert, "longer").unwrap();
        let rewritten = files.stamp();
        assert_ne!(rewritten, first);
        let renewed = dir.join("key.pem.new");
        std::fs::write(&renewed, "b").unwrap();
        std::fs::rename(&renewed, &files.key).unwrap();
        assert_ne!(files.stamp(), rewritten);
        std::fs::remove_dir_all(&dir).ok();
    }
}
