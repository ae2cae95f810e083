//! Revalidation of the embedded web app (RFC 9110 §13.1.2,
//! `If-None-Match`). Each asset's ETag is its hash, made at compile time,
//! and `Cache-Control: no-cache` has browsers ask each time: a browser that
//! has the file gets 304 and no body, and a new binary's files are fetched
//! at once.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The ETag of an asset whose hash is `hash`: 16 hex digits, quoted.
pub fn etag(hash: u64) -> String {
    format!("\"{hash:016x}\"")
}

/// Whether `If-None-Match` values name `etag` or are `*`. Weak
/// comparison, as RFC 9110 has it for this header: `W/` is ignored.
pub fn none_match<'a>(values: impl IntoIterator<Item = &'a [u8]>, etag: &str) -> bool {
    values
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// The answer to a GET of `asset` with request `headers`: 304 if the
/// browser has it, else the asset.
pub fn respond(asset: callisto_web::Asset, headers: &HeaderMap) -> Response {
    let tag = etag(asset.hash);
    let has_it = none_match(
        headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .map(HeaderValue::as_bytes),
        &tag,
    );
    // Assets change only with the binary; revalidate so an upgrade shows at once.
    let common = [
        (header::ETAG, tag),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
    ];
    if has_it {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TAG: &str = "\"00000000000000ab\"";

    #[test]
    fn matches_its_tag_in_any_list_weak_or_strong_and_star() {
        assert_eq!(etag(0xab), TAG);
        for yes in [
            TAG,
            "*",
            "W/\"00000000000000ab\"",
            "\"x\", \"00000000000000ab\"",
            " \"x\" ,W/\"00000000000000ab\" ",
        ] {
            assert!(none_match([yes.as_bytes()], TAG), "{yes}");
        }
        for no in [
            "",
            "\"00000000000000ac\"",
            "00000000000000ab",
            "\"x\"",
            "W/",
            "**",
        ] {
            assert!(!none_match([no.as_bytes()], TAG), "{no}");
        }
        // Several header lines count as one list.
        assert!(none_match([b"\"x\"".as_slice(), TAG.as_bytes()], TAG));
        assert!(!none_match([&[0xff, 0xfe][..]], TAG), "not UTF-8");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Any bytes: an answer, never a panic; and a list that holds the
        /// tag matches whatever else it holds.
        #[test]
        fn any_header_is_answered(
            before in proptest::collection::vec(any::<u8>(), 0..64),
            after in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = none_match([before.as_slice()], TAG);
            let mut list = before.clone();
            list.extend_from_slice(b",");
            list.extend_from_slice(TAG.as_bytes());
            list.extend_from_slice(b",");
            list.extend_from_slice(&after);
            if std::str::from_utf8(&list).is_ok() {
                prop_assert!(none_match([list.as_slice()], TAG));
            }
        }
    }
}
