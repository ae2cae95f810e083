//! When the served certificate stops being valid, and when to say so.
//!
//! A renewal that fails (a DNS change, a full disk, an ACME account
//! locked) goes unnoticed until the certificate expires and every browser
//! refuses the web app and TURN over TLS. The server reads the dates from
//! the certificate it serves, exports the expiry as a gauge to alert on,
//! and warns in the log while there is still time to renew by hand.
//!
//! The dates are read by hand from the certificate's DER: they sit at a
//! fixed place near its start, and the X.509 parsers (x509-parser, x509-cert)
//! would add a DER library and a dozen crates to the build for two fields.

use std::time::Duration;

/// A certificate's validity period, in Unix seconds (RFC 5280 §4.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Why the validity of a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    #[error("the certificate ends early or a length runs past it")]
    Truncated,
    #[error("expected {expected} in the certificate, found tag {found:#04x}")]
    UnexpectedTag { expected: &'static str, found: u8 },
    #[error("a DER length is not in its shortest form or is too long")]
    BadLength,
    #[error("a validity date is not UTCTime or GeneralizedTime in UTC: {0:?}")]
    BadTime(String),
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0; // [0] EXPLICIT, constructed
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

impl Validity {
    /// The validity of the DER `certificate`: Certificate → tbsCertificate →
    /// (version) serialNumber signature issuer validity.
    pub fn of_der(certificate: &[u8]) -> Result<Validity, ValidityError> {
        let (cert, _) = expect(certificate, SEQUENCE, "a Certificate SEQUENCE")?;
        let (mut tbs, _) = expect(cert, SEQUENCE, "a tbsCertificate SEQUENCE")?;
        if tbs.first() == Some(&VERSION) {
            tbs = expect(tbs, VERSION, "a version")?.1;
        }
        let rest = expect(tbs, INTEGER, "a serialNumber INTEGER")?.1;
        let rest = expect(rest, SEQUENCE, "a signature AlgorithmIdentifier")?.1;
        let rest = expect(rest, SEQUENCE, "an issuer Name")?.1;
        let (validity, _) = expect(rest, SEQUENCE, "a Validity SEQUENCE")?;
        let (not_before, rest) = time(validity)?;
        let (not_after, _) = time(rest)?;
        Ok(Validity {
            not_before,
            not_after,
        })
    }

    /// How long the certificate is meant to last.
    fn lifetime(&self) -> i64 {
        self.not_after.saturating_sub(self.not_before)
    }

    /// Where the certificate stands at `now` (Unix seconds).
    pub fn standing(&self, now: i64) -> Standing {
        if now < self.not_before {
            Standing::NotYetValid
        } else if now >= self.not_after {
            Standing::Expired
        } else if self.not_after - now < renewal_overdue_within(self.lifetime()) {
            Standing::RenewalOverdue
        } else {
            Standing::Valid
        }
    }
}

/// Left of a certificate's life when its renewal is overdue: a sixth of
/// it, at most 30 days. ACME clients renew with a third left (certbot: 30
/// days of Let's Encrypt's 90), so by then half of their window has passed
/// without a renewal. That holds for short-lived certificates too (a day
/// of a six-day one), and a certificate renewed by hand each year warns a
/// month ahead.
fn renewal_overdue_within(lifetime: i64) -> i64 {
    (lifetime / 6).min(30 * 24 * 3600)
}

/// Where a certificate stands, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Valid,
    /// Still valid, but it should have been renewed by now.
    RenewalOverdue,
    /// Clients refuse it.
    Expired,
    /// Clients refuse it until its start: the clock is behind, or it was
    /// issued with a start in the future.
    NotYetValid,
}

/// How often a standing that needs the operator is said again.
pub const REPEAT_WARNING: Duration = Duration::from_secs(24 * 3600);

/// Decides when to log about the served certificate's dates: when its
/// standing changes, and once a day while it is not [`Standing::Valid`].
/// Sans-IO: the caller brings the certificate's validity and the time.
#[derive(Debug, Default)]
pub struct ExpiryWarnings {
    said: Option<(Standing, Validity, i64)>,
}

impl ExpiryWarnings {
    /// The standing to log now, if any: never [`Standing::Valid`].
    pub fn check(&mut self, validity: Validity, now: i64) -> Option<Standing> {
        let standing = validity.standing(now);
        let changed = !matches!(self.said, Some((s, v, _)) if s == standing && v == validity);
        let due = self
            .said
            .is_none_or(|(_, _, at)| now.saturating_sub(at) >= REPEAT_WARNING.as_secs() as i64);
        if changed || (standing != Standing::Valid && due) {
            self.said = Some((standing, validity, now));
            return (standing != Standing::Valid).then_some(standing);
        }
        None
    }
}

/// The contents of the TLV at the start of `der`, which must have `tag`,
/// and what follows it.
fn expect<'a>(
    der: &'a [u8],
    tag: u8,
    expected: &'static str,
) -> Result<(&'a [u8], &'a [u8]), ValidityError> {
    let (&found, rest) = der.split_first().ok_or(ValidityError::Truncated)?;
    if found != tag {
        return Err(ValidityError::UnexpectedTag { expected, found });
    }
    let (&first, mut rest) = rest.split_first().ok_or(ValidityError::Truncated)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: 1 to 4 length bytes, in DER never for what the short
        // form says, and without leading zeros.
        let n = usize::from(first & 0x7f);
        if !(1..=4).contains(&n) || rest.len() < n {
            return Err(if rest.len() < n {
                ValidityError::Truncated
            } else {
                ValidityError::BadLength
            });
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        if bytes[0] == 0 {
            return Err(ValidityError::BadLength);
        }
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if len < 0x80 {
            return Err(ValidityError::BadLength);
        }
        len
    };
    if rest.len() < len {
        return Err(ValidityError::Truncated);
    }
    Ok(rest.split_at(len))
}

/// A Time (UTCTime or GeneralizedTime, as RFC 5280 §4.1.2.5 restricts
/// them: UTC, to the second) as Unix seconds, and what follows it.
fn time(der: &[u8]) -> Result<(i64, &[u8]), ValidityError> {
    let (&tag, _) = der.split_first().ok_or(ValidityError::Truncated)?;
    let (text, after) = match tag {
        UTC_TIME => expect(der, UTC_TIME, "a UTCTime")?,
        _ => expect(der, GENERALIZED_TIME, "a UTCTime or GeneralizedTime")?,
    };
    let bad = || ValidityError::BadTime(String::from_utf8_lossy(text).into_owned());
    let digits = text.strip_suffix(b"Z").ok_or_else(bad)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let number = |s: &[u8]| {
        s.iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'))
    };
    let (year, mmddhhmmss) = match (tag, digits.len()) {
        // RFC 5280: YY of 50 and more is 19YY, below is 20YY.
        (UTC_TIME, 12) => {
            let yy = number(&digits[..2]);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (number(&digits[..4]), &digits[4..]),
        _ => return Err(bad()),
    };
    let field = |i: usize| number(&mmddhhmmss[2 * i..2 * i + 2]);
    let month = u8::try_from(field(0))
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or_else(bad)?;
    let date = i32::try_from(year)
        .ok()
        .and_then(|y| u8::try_from(field(1)).ok().map(|d| (y, d)))
        .and_then(|(y, d)| time::Date::from_calendar_date(y, month, d).ok())
        .ok_or_else(bad)?;
    let hms = [field(2), field(3), field(4)].map(|v| u8::try_from(v).unwrap_or(u8::MAX));
    let moment = date.with_hms(hms[0], hms[1], hms[2]).map_err(|_| bad())?;
    Ok((moment.assume_utc().unix_timestamp(), after))
}

/// Unix seconds as an RFC 3339 date in UTC, for the log.
pub fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (Unix seconds)"),
    }
}

/// A self-signed certificate for example.test, signed with `key`, valid
/// over `[from, until]` (Unix seconds): for tests of whatever reads dates.
#[cfg(test)]
pub(crate) fn test_certificate(key: &rcgen::KeyPair, from: i64, until: i64) -> rcgen::Certificate {
    let mut params = rcgen::CertificateParams::new(vec!["example.test".into()]).unwrap();
    params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
    params.self_signed(key).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `openssl x509 -req` without extensions: a version 1 certificate (no
    /// version field), two UTCTimes. rustls serves none; it shows that the
    /// optional version field is read as optional.
    const OPENSSL_V1: &str = "-----BEGIN CERTIFICATE-----
MIIBCzCBsgIBBzAKBggqhkjOPQQDAjASMRAwDgYDVQQDDAd2MS50ZXN0MB4XDTI2
MTEyNzA4NDU1OVoXDTI2MTIyNzA4NDU1OVowEjEQMA4GA1UEAwwHdjEudGVzdDBZ
MBMGByqGSM49AgEGCCqGSM49AwEHA0IABGE2wuMahYoO9kC+tVlB+bpnODDlcixf
1f8dGnhStWlHG2p5U1h97exbvueMbBigepNyeHT29+bXurxtt7HLvF4wCgYIKoZI
zj0EAwIDSAAwRQIhAJFhbPlnjug98P7ZNslIf48Unr9agRgZ0ttCJVWyYDK1AiAz
mZJ47BjDMIQI97Rcu1jDcMkuWKGP5Lq+9i8VhgabXg==
-----END CERTIFICATE-----";

    /// `openssl req -x509 -days 10000`: version 3, valid from a UTCTime
    /// until a GeneralizedTime (2054).
    const OPENSSL_V3: &str = "-----BEGIN CERTIFICATE-----
MIIBhDCCASugAwIBAgIURb0sA0u8UNWCFnBR5wTfJVj2vj4wCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMZXhhbXBsZS50ZXN0MCAXDTI2MTEyNzA4NDYwMloYDzIwNTQw
NDE0MDg0NjAyWjAXMRUwEwYDVQQDDAxleGFtcGxlLnRlc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAARhNsLjGoWKDvZAvrVZQfm6Zzgw5XIsX9X/HRp4UrVpRxtq
eVNYfe3sW77njGwYoHqTcnh09vfm17q8bbexy7xeo1MwUTAdBgNVHQ4EFgQUtUkP
WKG0kNfc2CzWU7RsixFE/dQwHwYDVR0jBBgwFoAUtUkPWKG0kNfc2CzWU7RsixFE
/dQwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiB/wU4TRydcGZIg
vjSsA28tKoSx7q1Udmzl2NL1AGvyMAIgBz4YGf1+9YmbtOhe7ZgcOqfPE8KgZpeG
6ixXrvHMvpM=
-----END CERTIFICATE-----";

    fn der(pem: &str) -> Vec<u8> {
        let mut bytes = pem.as_bytes();
        let cert = rustls_pemfile::certs(&mut bytes).next().unwrap().unwrap();
        cert.as_ref().to_vec()
    }

    const DAY: i64 = 86_400;

    /// A certificate rcgen signs, valid over `[from, until]` (Unix seconds).
    fn rcgen_certificate(key: &rcgen::KeyPair, from: i64, until: i64) -> Vec<u8> {
        test_certificate(key, from, until).der().to_vec()
    }

    fn key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate().unwrap()
    }

    #[test]
    fn reads_the_dates_openssl_and_rcgen_write() {
        // The expected values are `date -u -d "$(openssl x509 -noout
        // -startdate ...)" +%s`.
        assert_eq!(
            Validity::of_der(&der(OPENSSL_V1)),
            Ok(Validity {
                not_before: 1_795_769_159,
                not_after: 1_798_361_159
            })
        );
        assert_eq!(
            Validity::of_der(&der(OPENSSL_V3)),
            Ok(Validity {
                not_before: 1_795_769_162,
                not_after: 2_659_769_162
            })
        );
        // rcgen's defaults: 1975-01-01 to 4096-01-01 (GeneralizedTime).
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert_eq!(
            Validity::of_der(generated.cert.der()),
            Ok(Validity {
                not_before: 157_766_400,
                not_after: 67_090_118_400
            })
        );
        assert_eq!(rfc3339(1_798_361_159), "2026-12-27T08:45:59Z");
        assert_eq!(rfc3339(67_090_118_400), "4096-01-01T00:00:00Z");
    }

    #[test]
    fn malformed_certificates_are_errors() {
        let good = der(OPENSSL_V1);
        assert_eq!(Validity::of_der(&[]), Err(ValidityError::Truncated));
        assert!(matches!(
            Validity::of_der(&[0x31, 0]),
            Err(ValidityError::UnexpectedTag { found: 0x31, .. })
        ));
        // A length in long form that the short form could say.
        assert_eq!(
            Validity::of_der(&[0x30, 0x81, 0x05, 0, 0, 0, 0, 0]),
            Err(ValidityError::BadLength)
        );
        // A length longer than the certificate.
        let mut long = good.clone();
        long[3] = 0xff;
        assert_eq!(Validity::of_der(&long), Err(ValidityError::Truncated));
        // Month 13 in notBefore (YYMMDD at offset 0x4b of this one).
        let at = good
            .windows(13)
            .position(|w| w == b"261127084559Z")
            .unwrap();
        let mut month = good.clone();
        month[at + 2..at + 4].copy_from_slice(b"13");
        assert!(matches!(
            Validity::of_der(&month),
            Err(ValidityError::BadTime(t)) if t == "261327084559Z"
        ));
        let mut not_utc = good.clone();
        not_utc[at + 12] = b'+';
        assert!(matches!(
            Validity::of_der(&not_utc),
            Err(ValidityError::BadTime(_))
        ));
    }

    #[test]
    fn the_years_of_utc_time_wrap_at_1950() {
        let key = key();
        for (from, until) in [
            (-631_152_000, -631_152_000 + DAY),       // 1950-01-01
            (2_524_607_999, 2_524_608_000),           // 2049-12-31T23:59:59, 2050
            (946_684_800 - 1, 946_684_800 + 1),       // around 2000
            (253_402_300_799 - DAY, 253_402_300_799), // 9999-12-31T23:59:59
        ] {
            assert_eq!(
                Validity::of_der(&rcgen_certificate(&key, from, until)),
                Ok(Validity {
                    not_before: from,
                    not_after: until
                })
            );
        }
    }

    #[test]
    fn standing_over_a_certificates_life() {
        // 90 days from day 0: overdue in its last 15 (a sixth).
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        assert_eq!(v.standing(-1), Standing::NotYetValid);
        assert_eq!(v.standing(0), Standing::Valid);
        assert_eq!(v.standing(75 * DAY), Standing::Valid);
        assert_eq!(v.standing(75 * DAY + 1), Standing::RenewalOverdue);
        assert_eq!(v.standing(90 * DAY - 1), Standing::RenewalOverdue);
        assert_eq!(v.standing(90 * DAY), Standing::Expired);
        // A year's certificate warns a month ahead; a six-day one, a day.
        let year = Validity {
            not_before: 0,
            not_after: 365 * DAY,
        };
        assert_eq!(year.standing(335 * DAY), Standing::Valid);
        assert_eq!(year.standing(335 * DAY + 1), Standing::RenewalOverdue);
        let short = Validity {
            not_before: 0,
            not_after: 6 * DAY,
        };
        assert_eq!(short.standing(5 * DAY), Standing::Valid);
        assert_eq!(short.standing(5 * DAY + 1), Standing::RenewalOverdue);
    }

    #[test]
    fn warnings_come_on_a_change_and_then_daily() {
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        let mut w = ExpiryWarnings::default();
        assert_eq!(w.check(v, DAY), None, "valid: nothing to say");
        assert_eq!(w.check(v, 2 * DAY), None);
        let overdue = 80 * DAY;
        assert_eq!(w.check(v, overdue), Some(Standing::RenewalOverdue));
        assert_eq!(w.check(v, overdue + 3600), None);
        assert_eq!(w.check(v, overdue + DAY - 1), None);
        assert_eq!(w.check(v, overdue + DAY), Some(Standing::RenewalOverdue));
        // Expiry is said at once, however recent the last warning.
        assert_eq!(w.check(v, 90 * DAY), Some(Standing::Expired));
        assert_eq!(w.check(v, 90 * DAY + 3600), None);
        // Renewed: nothing; its own overdue time is said again.
        let renewed = Validity {
            not_before: 89 * DAY,
            not_after: 179 * DAY,
        };
        assert_eq!(w.check(renewed, 90 * DAY + 7200), None);
        assert_eq!(w.check(renewed, 91 * DAY), None);
        assert_eq!(w.check(renewed, 170 * DAY), Some(Standing::RenewalOverdue));
        // A server started with an expired certificate says so at once.
        let mut fresh = ExpiryWarnings::default();
        assert_eq!(fresh.check(v, 100 * DAY), Some(Standing::Expired));
        let mut early = ExpiryWarnings::default();
        assert_eq!(early.check(renewed, 0), Some(Standing::NotYetValid));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any validity rcgen can write (it picks UTCTime for 1950–2049,
        /// GeneralizedTime otherwise) reads back as written.
        #[test]
        fn rcgen_dates_read_back(
            from in -631_152_000i64..253_402_300_799,
            len in 0i64..400 * DAY,
        ) {
            let until = (from + len).min(253_402_300_799);
            let cert = KEY.with(|k| rcgen_certificate(k, from, until));
            prop_assert_eq!(
                Validity::of_der(&cert),
                Ok(Validity { not_before: from, not_after: until })
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Validity::of_der(&bytes);
        }

        /// A certificate cut short, or with a byte changed, is read or
        /// refused, never a panic.
        #[test]
        fn damaged_certificates_never_panic(
            cut in 0usize..400,
            at in 0usize..400,
            byte in any::<u8>(),
        ) {
            for pem in [OPENSSL_V1, OPENSSL_V3] {
                let good = der(pem);
                let cut = cut.min(good.len());
                if cut < good.len() {
                    prop_assert!(Validity::of_der(&good[..cut]).is_err());
                }
                let mut changed = good.clone();
                let at = at % changed.len();
                changed[at] = byte;
                let _ = Validity::of_der(&changed);
            }
        }
    }

    thread_local! {
        static KEY: rcgen::KeyPair = key();
    }
}
