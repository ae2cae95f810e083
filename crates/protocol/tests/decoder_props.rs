//! Property tests: nothing a client can send makes the decoder panic, and
//! everything it refuses maps to a protocol error code.

use callisto_protocol::{ClientMessage, ErrorCode, decode_client};
use proptest::prelude::*;
use serde_json::Value;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Finite floats only (JSON has no NaN or infinity), generated
        // rather than filtered: a filter's rejections abort long runs.
        (prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO)
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("join"),
            Just("signal"),
            Just("broadcast"),
            Just("leave"),
            Just("ping"),
            Just("lock"),
            Just("admit"),
            Just("deny"),
            Just("type"),
            Just("room"),
            Just("data")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("room".to_string()),
                    Just("name".to_string()),
                    Just("to".to_string()),
                    Just("data".to_string()),
                    Just("id".to_string()),
                    Just("locked".to_string()),
                    "[a-z]{0,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = decode_client(&text) {
            prop_assert!(ErrorCode::ALL.contains(&e.code));
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn arbitrary_json_is_decoded_or_refused_with_a_code(value in arb_json()) {
        let text = value.to_string();
        match decode_client(&text) {
            Ok(msg) => {
                // Whatever was accepted must have had the matching type.
                let kind = value.get("type").and_then(Value::as_str);
                prop_assert_eq!(kind, Some(msg.kind()));
                // `data` is relayed byte for byte. (Comparing it parsed
                // again would test serde_json's float parsing, which is
                // not exact without its `float_roundtrip` feature: a
                // 300,000-case run found 1.0679026912420585e-132 coming
                // back one ulp off.)
                if let ClientMessage::Signal { data, .. } | ClientMessage::Broadcast { data } = &msg {
                    prop_assert_eq!(data.get(), value["data"].to_string());
                }
                match msg {
                    ClientMessage::Lock { locked, open_to_audience } => {
                        prop_assert_eq!(Some(locked), value["locked"].as_bool());
                        prop_assert_eq!(open_to_audience, value["openToAudience"].as_bool().unwrap_or(false));
                    }
                    ClientMessage::Admit { id } | ClientMessage::Deny { id } => prop_assert_eq!(Some(id.as_str()), value["id"].as_str()),
                    _ => {}
                }
            }
            Err(e) => {
                let is_join = value.get("type").and_then(Value::as_str) == Some("join");
                if !is_join {
                    prop_assert_eq!(e.code, ErrorCode::BadMessage);
                } else {
                    prop_assert!(matches!(e.code, ErrorCode::BadMessage | ErrorCode::BadRoom | ErrorCode::BadName));
                }
            }
        }
    }

    #[test]
    fn valid_joins_round_trip(
        room in "[A-Za-z0-9_-]{1,64}",
        name in "\\PC{1,64}",
        resume in proptest::option::of("\\PC{1,16}"),
        access in proptest::option::of("\\PC{1,64}"),
        watching in proptest::option::of(proptest::bool::ANY),
    ) {
        let mut join = serde_json::json!({"type": "join", "room": room, "name": name});
        if let Some(token) = &resume {
            join["resume"] = Value::from(token.as_str());
        }
        if let Some(code) = &access {
            join["access"] = Value::from(code.as_str());
        }
        if let Some(w) = watching {
            join["watching"] = Value::from(w);
        }
        let text = join.to_string();
        match decode_client(&text) {
            Ok(ClientMessage::Join { room: r, name: n, resume: t, access: a, watching: w }) => {
                prop_assert_eq!(w, watching.unwrap_or(false));
                prop_assert_eq!(r, room);
                prop_assert_eq!(n, name.trim());
                prop_assert_eq!(t, resume);
                prop_assert_eq!(a, access);
            }
            Ok(other) => prop_assert!(false, "decoded as {:?}", other),
            Err(e) => prop_assert_eq!(e.code, ErrorCode::BadName, "{}", e.message),
        }
    }
}
