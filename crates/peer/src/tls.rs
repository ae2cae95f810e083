//! TLS for the signaling connection (`wss://`): the server's certificate
//! is checked against the system's root certificates, or, for a server
//! with a self-signed certificate (`callisto serve --tls-self-signed`,
//! which prints its fingerprint), against that fingerprint alone, as SSH
//! checks a known host.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::http::Uri;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A certificate's SHA-256 fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = TlsError;

    /// 64 hex digits, in pairs separated by colons or not, in either case:
    /// as `callisto serve` logs it (`AB:CD:…`) or `openssl x509 -fingerprint
    /// -sha256` prints it.
    fn from_str(text: &str) -> Result<Self, TlsError> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        let bad = || TlsError::BadFingerprint(text.chars().take(100).collect());
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What went wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{0:?} is not a SHA-256 fingerprint: give 64 hex digits, as AB:CD:… (callisto serve logs it)"
    )]
    BadFingerprint(String),
    #[error(
        "no root certificates found on this system (install ca-certificates), or pin the server's certificate with its fingerprint"
    )]
    NoRoots,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The client configuration for `wss://` to `url`: the system's roots,
/// or only the certificate with the fingerprint `pin`.
pub fn client_config(pin: Option<Fingerprint>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match pin {
        Some(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
            .with_no_client_auth(),
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Whether `url` needs TLS.
pub fn is_secure(url: &Uri) -> bool {
    url.scheme_str() == Some("wss")
}

/// Takes exactly one certificate: the pinned one. Its name and dates do
/// not matter (a self-signed certificate for a LAN may name an address
/// the client does not use); the handshake's signatures are still
/// checked, so only the holder of its key gets through.
#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin.0 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has the fingerprint {}, not the one given ({:?})",
                hex(digest.as_ref()),
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fingerprints_are_read_as_callisto_and_openssl_print_them() {
        let colons = "AB:".repeat(31) + "CD";
        let plain = "ab".repeat(31) + "cd";
        let want = {
            let mut b = [0xAB; 32];
            b[31] = 0xCD;
            Fingerprint(b)
        };
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), want);
        assert_eq!(plain.parse::<Fingerprint>().unwrap(), want);
        assert_eq!(format!("{want:?}"), colons);
        for bad in ["", "AB", &"ZZ".repeat(32), &"A".repeat(65), &"é".repeat(32)] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_text_is_a_fingerprint_or_an_error(text in "\\PC{0,120}") {
            let _ = text.parse::<Fingerprint>();
        }

        #[test]
        fn fingerprints_round_trip(bytes: [u8; 32]) {
            let shown = format!("{:?}", Fingerprint(bytes));
            prop_assert_eq!(shown.parse::<Fingerprint>().unwrap(), Fingerprint(bytes));
        }
    }
}
