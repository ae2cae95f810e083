//! TLS for the web server: certificates from PEM files or generated at start,
//! and a listener that does handshakes off the accept path so that one slow
//! or silent client cannot stall everyone else's connections, and hands
//! TURN over TLS on the same port to the TURN server.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use callisto_turn::net::StreamConnections;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::connections::{FirstByteBack, Guarded, LimitedListener};

/// Why TLS could not be set up; every variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the certificate and key do not form a usable TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("generating a self-signed certificate for {names:?}: {source}")]
    Generate {
        names: Vec<String>,
        source: rcgen::Error,
    },
}

/// A ready server configuration and the leaf certificate's SHA-256
/// fingerprint, for users to compare with what their browser shows.
pub struct TlsSetup {
    pub config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
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

/// Loads a certificate chain and key from PEM files.
pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsSetup, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: key.display().to_string(),
        })?;
    build(chain, key_der)
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
    build(vec![cert], key)
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsSetup, TlsError> {
    let fingerprint = fingerprint(&chain[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // The same configuration serves TURN over TLS, whose clients may offer
    // "stun.turn" alone (RFC 7443): without it in the list, the handshake
    // of such a client would fail for want of a common protocol.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"stun.turn".to_vec()];
    Ok(TlsSetup {
        config: Arc::new(config),
        fingerprint,
    })
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

    #[test]
    fn self_signed_has_a_fingerprint() {
        let setup = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(setup.fingerprint.len(), 32 * 3 - 1);
        assert!(setup.fingerprint.split(':').all(|h| h.len() == 2));
    }

    #[test]
    fn pem_files_round_trip_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("callisto-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        assert!(from_pem_files(&cert, &key).is_ok());

        let err = from_pem_files(&key, &key).err().unwrap();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = from_pem_files(&cert, &cert).err().unwrap();
        assert!(err.to_string().contains("cert.pem"), "{err}");
        let err = from_pem_files(&dir.join("missing.pem"), &key)
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
