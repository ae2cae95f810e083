//! Which web pages may open a signaling WebSocket. A browser lets any page
//! open a WebSocket to any server, and says which site the page is from
//! (the Origin header). Unchecked, any website could have its visitors'
//! browsers join rooms here, take TURN credentials from `welcome` and
//! relay through this server at its operator's cost, or spread a flood
//! over all its visitors' addresses, each within the per-address limits.
//!
//! So a browser's WebSocket must come from a page of this server's own
//! host (the Origin's host is the host the request is for, as
//! gorilla/websocket and Tornado check by default), or from an origin
//! allowed with `--allowed-origin`. Ports are not compared: proxies often
//! drop the port from the Host they pass on (nginx's `$host`), and a page
//! on another port of the same host is the same operator's. Clients that
//! are not browsers send no Origin and are not asked, since they could
//! write any.

use std::fmt;

/// A `--allowed-origin` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigin {
    /// `*`: any page at all.
    Any,
    /// A serialized origin, lowercased, such as `https://app.example.org`.
    Exactly(String),
}

/// Which origins are let through besides the server's own host's.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    allowed: Vec<String>,
}

/// Why a WebSocket was refused: its page is from another site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignOrigin {
    /// The Origin header, made printable and cut short for the log.
    pub origin: String,
    /// The Host header, likewise; empty if there was none.
    pub host: String,
}

impl fmt::Display for ForeignOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a page from {} may not use the signaling of {}",
            self.origin,
            if self.host.is_empty() {
                "this server"
            } else {
                &self.host
            }
        )
    }
}

impl OriginPolicy {
    pub fn new(allowed: Vec<AllowedOrigin>) -> Self {
        let mut policy = OriginPolicy::default();
        for origin in allowed {
            match origin {
                AllowedOrigin::Any => policy.any = true,
                AllowedOrigin::Exactly(o) => policy.allowed.push(o),
            }
        }
        policy
    }

    /// Whether a WebSocket request with these Origin and Host headers may
    /// go on. `forwarded_host` is the X-Forwarded-Host of a request from a
    /// trusted proxy: one that passes on a Host of its own (Apache's
    /// default) says there which host the client asked for. (A page
    /// cannot write that header, nor any other, on a WebSocket request.)
    pub fn check(
        &self,
        origin: Option<&[u8]>,
        host: Option<&[u8]>,
        forwarded_host: Option<&[u8]>,
    ) -> Result<(), ForeignOrigin> {
        let Some(origin) = origin else {
            return Ok(());
        };
        if self.any {
            return Ok(());
        }
        let text = std::str::from_utf8(origin).ok();
        let forwarded = forwarded_host
            .and_then(|h| std::str::from_utf8(h).ok())
            .into_iter()
            .flat_map(|h| h.split(',').map(str::trim));
        let mut hosts = host
            .and_then(|h| std::str::from_utf8(h).ok())
            .into_iter()
            .chain(forwarded);
        let same_host = text
            .and_then(origin_host)
            .is_some_and(|page| hosts.any(|host| page.eq_ignore_ascii_case(host_part(host))));
        let allowed = text.is_some_and(|o| {
            let o = o.trim_end_matches('/');
            self.allowed.iter().any(|a| a.eq_ignore_ascii_case(o))
        });
        if same_host || allowed {
            return Ok(());
        }
        Err(ForeignOrigin {
            origin: printable(origin),
            host: host.map(printable).unwrap_or_default(),
        })
    }
}

/// The host of a serialized origin (`https://host:port`), without the
/// port; None if it is not one (`null`, say).
fn origin_host(origin: &str) -> Option<&str> {
    let (scheme, authority) = origin.split_once("://")?;
    if scheme.is_empty() || authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    let host = host_part(authority);
    (!host.is_empty()).then_some(host)
}

/// `host[:port]` without the port; an IPv6 literal keeps its brackets.
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// A header value fit for a log line: escaped, and cut at 100 characters.
fn printable(value: &[u8]) -> String {
    callisto_turn::server::loggable(value, 100)
}

/// Reads an `--allowed-origin` value.
pub fn parse_flag(value: &str) -> Result<AllowedOrigin, String> {
    if value == "*" {
        return Ok(AllowedOrigin::Any);
    }
    let origin = value.trim_end_matches('/').to_ascii_lowercase();
    let scheme_ok = origin.starts_with("https://") || origin.starts_with("http://");
    if !scheme_ok || origin_host(&origin).is_none() {
        return Err(format!(
            "{value:?} is not an origin: give scheme and host, and the port if not the scheme's own, such as https://app.example.org or http://localhost:3000 (or * for any)"
        ));
    }
    Ok(AllowedOrigin::Exactly(origin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(policy: &OriginPolicy, origin: Option<&str>, host: Option<&str>) -> bool {
        policy
            .check(origin.map(str::as_bytes), host.map(str::as_bytes), None)
            .is_ok()
    }

    #[test]
    fn a_proxy_may_say_which_host_was_asked_for() {
        let p = OriginPolicy::default();
        let asked = |origin: &str, forwarded: &str| {
            p.check(
                Some(origin.as_bytes()),
                Some(b"127.0.0.1:8080"),
                Some(forwarded.as_bytes()),
            )
            .is_ok()
        };
        assert!(asked("https://call.example.org", "call.example.org"));
        assert!(asked(
            "https://call.example.org",
            "call.example.org:443, inner.lan"
        ));
        assert!(!asked("https://elsewhere.example", "call.example.org"));
        assert!(!asked("https://call.example.org", ""));
    }

    #[test]
    fn pages_of_this_host_are_let_through_and_others_not() {
        let p = OriginPolicy::default();
        for (origin, host) in [
            ("https://call.example.org", "call.example.org"),
            ("https://Call.Example.org", "call.example.org"),
            ("https://call.example.org:8443", "call.example.org:8443"),
            // A proxy dropped the port: the host is what counts.
            ("http://127.0.0.1:41000", "127.0.0.1"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            assert!(check(&p, Some(origin), Some(host)), "{origin} on {host}");
        }
        for (origin, host) in [
            ("https://evil.example", Some("call.example.org")),
            (
                "https://call.example.org.evil.example",
                Some("call.example.org"),
            ),
            (
                "https://call.example.org@evil.example",
                Some("call.example.org"),
            ),
            ("null", Some("call.example.org")),
            ("https://call.example.org", None),
            ("http://[::2]:8080", Some("[::1]:8080")),
        ] {
            assert!(!check(&p, Some(origin), host), "{origin} on {host:?}");
        }
        // Clients that are not browsers send none.
        assert!(check(&p, None, Some("call.example.org")));
        assert!(check(&p, None, None));
    }

    #[test]
    fn the_flag_lets_other_origins_through() {
        let p = OriginPolicy::new(vec![parse_flag("https://App.example.org/").unwrap()]);
        assert!(check(
            &p,
            Some("https://app.example.org"),
            Some("call.example.org")
        ));
        // The whole origin counts: not another scheme or port.
        assert!(!check(
            &p,
            Some("http://app.example.org"),
            Some("call.example.org")
        ));
        assert!(!check(
            &p,
            Some("https://app.example.org:444"),
            Some("call.example.org")
        ));
        let any = OriginPolicy::new(vec![parse_flag("*").unwrap()]);
        assert!(check(&any, Some("null"), None));
        for bad in [
            "app.example.org",
            "ftp://x",
            "https://",
            "https://a/b",
            "*.example.org",
        ] {
            let err = parse_flag(bad).unwrap_err();
            assert!(err.contains("not an origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_refusal_says_what_came_escaped_and_short() {
        let p = OriginPolicy::default();
        let long = format!("https://{}\n.example", "a".repeat(200));
        let err = p
            .check(Some(long.as_bytes()), Some(b"call.example.org"), None)
            .unwrap_err();
        assert!(
            !err.origin.contains('\n') && err.origin.ends_with('…'),
            "{err:?}"
        );
        assert!(err.origin.chars().count() < 110, "{err:?}");
        assert_eq!(
            p.check(
                Some(b"https://evil.example"),
                Some(b"call.example.org"),
                None
            )
            .unwrap_err()
            .to_string(),
            "a page from https://evil.example may not use the signaling of call.example.org"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Any header bytes: an answer, never a panic.
        #[test]
        fn any_headers_get_an_answer(
            origin in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..120)),
            host in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..120)),
        ) {
            let _ = OriginPolicy::default().check(origin.as_deref(), host.as_deref(), host.as_deref());
        }

        /// A page is let through exactly when its host is the request's.
        #[test]
        fn the_host_decides(
            page in "[a-z0-9.-]{1,20}",
            host in "[a-z0-9.-]{1,20}",
            port in proptest::option::of(1u16..),
            https in any::<bool>(),
        ) {
            let scheme = if https { "https" } else { "http" };
            let origin = match port {
                Some(p) => format!("{scheme}://{page}:{p}"),
                None => format!("{scheme}://{page}"),
            };
            let ok = OriginPolicy::default()
                .check(Some(origin.as_bytes()), Some(host.as_bytes()), None)
                .is_ok();
            prop_assert_eq!(ok, page == host);
        }
    }
}
