//! Bad input gets a 4xx naming the field, and nothing is written.

use serde_json::{Value, json};
use tessera_tests::{TestSuite, backend_tests};

use crate::points;

backend_tests!(bad_input_is_refused_naming_the_field);

async fn send_raw(
    suite: &TestSuite,
    key: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = suite
        .http
        .post(format!("{}/v1/customers/hal/points", suite.base_url))
        .bearer_auth(&suite.admin_key)
        .header("Content-Type", content_type)
        .body(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn field(body: &Value) -> &str {
    body["error"]["field_violations"][0]["field"]
        .as_str()
        .unwrap_or_default()
}

async fn bad_input_is_refused_naming_the_field(suite: TestSuite) {
    let json = "application/json";
    // (what, idempotency key, content type, body, expected status, expected field)
    type Case<'a> = (&'a str, Option<&'a str>, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            Some("bad-1"),
            json,
            b"{\"amount\": ".to_vec(),
            400,
            "body",
        ),
        (
            "unknown field",
            Some("bad-2"),
            json,
            br#"{"amount": 5, "amonut": 5}"#.to_vec(),
            400,
            "amonut",
        ),
        (
            "negative amount",
            Some("bad-3"),
            json,
            br#"{"amount": -5}"#.to_vec(),
            400,
            "amount",
        ),
        (
            "zero amount",
            Some("bad-4"),
            json,
            br#"{"amount": 0}"#.to_vec(),
            400,
            "amount",
        ),
        (
            "fractional amount",
            Some("bad-5"),
            json,
            br#"{"amount": 1.5}"#.to_vec(),
            400,
            "amount",
        ),
        (
            "amount as string",
            Some("bad-6"),
            json,
            br#"{"amount": "5"}"#.to_vec(),
            400,
            "amount",
        ),
        (
            "missing amount",
            Some("bad-7"),
            json,
            br#"{"reason": "x"}"#.to_vec(),
            400,
            "amount",
        ),
        (
            "bad programme",
            Some("bad-8"),
            json,
            br#"{"amount": 5, "program": "No Such!"}"#.to_vec(),
            400,
            "asset.code",
        ),
        (
            "not JSON",
            Some("bad-9"),
            "text/plain",
            b"amount=5".to_vec(),
            400,
            "Content-Type",
        ),
        (
            "no idempotency key",
            None,
            json,
            br#"{"amount": 5}"#.to_vec(),
            400,
            "Idempotency-Key",
        ),
        (
            "oversized body",
            Some("bad-10"),
            json,
            format!("{{\"reason\": \"{}\"}}", "x".repeat(100_000)).into_bytes(),
            413,
            "",
        ),
    ];
    for (what, key, content_type, body, status, expected_field) in cases {
        let (got, body) = send_raw(&suite, key, content_type, body).await;
        assert_eq!(got, status, "{what}: {body}");
        assert!(
            body["error"]["request_id"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{what}: {body}"
        );
        if status == 400 {
            assert_eq!(body["error"]["code"], "invalid_argument", "{what}");
            assert_eq!(field(&body), expected_field, "{what}: {body}");
        } else {
            assert_eq!(body["error"]["code"], "payload_too_large", "{what}");
        }
    }
    // Nothing was written, and the keys of refused requests are still free.
    assert_eq!(points(&suite, "hal").await, 0);
    let ok = suite
        .post(
            "/v1/customers/hal/points",
            Some("bad-3"),
            &json!({"amount": 5}),
        )
        .await;
    assert_eq!(ok.status(), 201);
    assert_eq!(points(&suite, "hal").await, 5);
    suite.cleanup().await;
}
