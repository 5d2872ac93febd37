//! Messages to customers through real transports in this process: an SMTP server that
//! speaks enough SMTP to take mail (and refuses one recipient for good), and an HTTP SMS
//! provider. Templates per campaign and locale with brand variables; consent decided at
//! send time (marketing needs it, a referred friend gets only the consent request until
//! they agree); the unsubscribe link; the delivery log; transient and permanent failures;
//! a campaign distributed to a segment with its summary, and its codes as CSV.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::eligibility::v1 as epb;
use tessera_runtime::config::HttpProviderConfig;
use tessera_tests::{TENANT, TestSuite, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::eligibility::{self, key};

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_respect_consent_and_reach_real_transports() {
        super::messages_respect_consent_and_reach_real_transports(tessera_tests::Backend::Embedded)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_campaign_is_distributed_to_a_segment() {
        super::a_campaign_is_distributed_to_a_segment(tessera_tests::Backend::Embedded).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_respect_consent_and_reach_real_transports() {
        super::messages_respect_consent_and_reach_real_transports(
            tessera_tests::Backend::Production,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_campaign_is_distributed_to_a_segment() {
        super::a_campaign_is_distributed_to_a_segment(tessera_tests::Backend::Production).await;
    }
}

/// A mail the SMTP server took.
#[derive(Debug, Clone, Default)]
struct Mail {
    to: Vec<String>,
    data: String,
}

impl Mail {
    /// A header's value, unfolded.
    fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?.replace("\r\n ", " ");
        let prefix = format!("{}:", name.to_ascii_lowercase());
        head.split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
    }
}

/// An SMTP server: greets, takes MAIL/RCPT/DATA, refuses recipients starting with
/// `reject` (550: permanent).
#[derive(Clone, Default)]
struct Smtp {
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl Smtp {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind smtp");
        let url = format!("smtp://{}", listener.local_addr().expect("addr"));
        let smtp = Smtp::default();
        let server = smtp.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(server.clone().session(socket));
            }
        });
        (smtp, url)
    }

    async fn session(self, socket: tokio::net::TcpStream) {
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        let _ = write.write_all(b"220 sink ESMTP\r\n").await;
        let mut mail = Mail::default();
        while let Ok(Some(line)) = lines.next_line().await {
            let upper = line.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-sink\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("HELO") || upper.starts_with("MAIL FROM:") {
                b"250 OK\r\n"
            } else if upper.starts_with("RCPT TO:") {
                let address = line[8..].trim().trim_matches(['<', '>']).to_string();
                if address.starts_with("reject") {
                    b"550 5.1.1 no such user\r\n"
                } else {
                    mail.to.push(address);
                    b"250 OK\r\n"
                }
            } else if upper == "DATA" {
                let _ = write.write_all(b"354 go ahead\r\n").await;
                let mut data = String::new();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l == "." {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                    data.push_str("\r\n");
                }
                mail.data = data;
                self.mails
                    .lock()
                    .expect("mails")
                    .push(std::mem::take(&mut mail));
                b"250 queued\r\n"
            } else if upper == "QUIT" {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
                mail = Mail::default();
                b"250 OK\r\n"
            } else {
                b"502 not implemented\r\n"
            };
            let _ = write.write_all(reply).await;
        }
    }

    fn to(&self, address: &str) -> Vec<Mail> {
        self.mails
            .lock()
            .expect("mails")
            .iter()
            .filter(|m| m.to.iter().any(|t| t == address))
            .cloned()
            .collect()
    }
}

/// An SMS provider: records JSON bodies, answers 503 to the first `fail_first` requests.
#[derive(Clone, Default)]
struct SmsProvider {
    received: Arc<Mutex<Vec<Value>>>,
    fail_first: Arc<AtomicU32>,
}

impl SmsProvider {
    async fn start() -> (Self, String) {
        let provider = SmsProvider::default();
        let app = axum::Router::new()
            .route(
                "/sms",
                axum::routing::post(
                    |axum::extract::State(p): axum::extract::State<SmsProvider>,
                     axum::Json(body): axum::Json<Value>| async move {
                        p.received.lock().expect("sms").push(body);
                        let failing = p
                            .fail_first
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if failing {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            axum::http::StatusCode::ACCEPTED
                        }
                    },
                ),
            )
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sms");
        let url = format!("http://{}/sms", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (provider, url)
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().expect("sms").clone()
    }
}

/// A suite whose e-mail and SMS go to the given servers.
async fn start(
    backend: tessera_tests::Backend,
    smtp_url: &str,
    sms_url: &str,
) -> Option<TestSuite> {
    let mut config = tessera_tests::test_config(backend)?;
    config.channels.smtp_url = Some(smtp_url.to_string());
    config.channels.sms = Some(HttpProviderConfig {
        url: sms_url.to_string(),
        headers: [("authorization".to_string(), "Bearer sms-test".to_string())].into(),
        body:
            r#"{"to": {{ to|tojson }}, "text": {{ text|tojson }}, "ref": {{ message_id|tojson }}}"#
                .into(),
    });
    config.channels.retry_schedule_secs = vec![0, 1, 1];
    config.channels.public_url = "https://rewards.acme.test".into();
    Some(TestSuite::start_with(backend, config, false).await)
}

async fn put(suite: &TestSuite, path: &str, body: &Value) -> reqwest::Response {
    suite
        .http
        .put(format!("{}{path}", suite.base_url))
        .bearer_auth(&suite.admin_key)
        .header("Idempotency-Key", key())
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn json(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// The brand and the templates the tests use.
async fn brand_and_templates(suite: &TestSuite) {
    json(
        put(
            suite,
            "/v1/brand",
            &json!({"name": "Acme", "fromEmail": "rewards@acme.test", "fromName": "Acme Rewards",
                    "variables": {"colour": "#ff5500"}}),
        )
        .await,
        200,
    )
    .await;
    for template in [
        json!({"name": "spring", "channel": "CHANNEL_EMAIL", "purpose": "MESSAGE_PURPOSE_MARKETING",
               "subject": "Spring offer from {{ brand.name }}",
               "bodyText": "Your code: {{ code }}\nUnsubscribe: {{ unsubscribe_url }}",
               "bodyHtml": "<p style=\"color: {{ brand.colour }}\">{{ code }} for {{ customer.id }}</p>"}),
        json!({"name": "spring", "channel": "CHANNEL_EMAIL", "locale": "it",
               "purpose": "MESSAGE_PURPOSE_MARKETING",
               "subject": "Offerta di primavera da {{ brand.name }}",
               "bodyText": "Il tuo codice: {{ code }}"}),
        json!({"name": "spring", "channel": "CHANNEL_SMS", "purpose": "MESSAGE_PURPOSE_MARKETING",
               "bodyText": "{{ brand.name }}: code {{ code }}"}),
        json!({"name": "receipt", "channel": "CHANNEL_EMAIL", "purpose": "MESSAGE_PURPOSE_TRANSACTIONAL",
               "subject": "Your points", "bodyText": "You have new points, {{ customer.id }}."}),
        json!({"name": "consent", "channel": "CHANNEL_EMAIL", "purpose": "MESSAGE_PURPOSE_CONSENT_REQUEST",
               "subject": "May we write to you?", "bodyText": "Say yes to offers from {{ brand.name }}."}),
    ] {
        json(put(suite, "/v1/templates", &template).await, 200).await;
    }
}

async fn customer(e: &mut eligibility::Client, suite: &TestSuite, c: epb::CustomerInput) {
    eligibility::upsert(e, suite, c).await;
}

fn consents(pairs: &[(&str, bool)]) -> std::collections::BTreeMap<String, bool> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
}

/// Sends `template` on `channel` and waits until it is no longer queued.
async fn send(
    suite: &TestSuite,
    customer: &str,
    channel: &str,
    template: &str,
    vars: Value,
) -> Value {
    let queued = json(
        suite
            .post(
                &format!("/v1/customers/{customer}/messages"),
                Some(&key()),
                &json!({"channel": channel, "template": template, "variables": vars}),
            )
            .await,
        202,
    )
    .await;
    assert_eq!(queued["status"], "MESSAGE_STATUS_QUEUED");
    let id = queued["id"].as_str().expect("id").to_string();
    eventually(Duration::from_secs(15), "the message settles", || async {
        let log = json(
            suite
                .get(&format!("/v1/customers/{customer}/messages"))
                .await,
            200,
        )
        .await;
        log["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|m| m["id"] == id.as_str() && m["status"] != "MESSAGE_STATUS_QUEUED")
            .cloned()
    })
    .await
}

fn outcome(m: &Value) -> (&str, &str) {
    (
        m["status"].as_str().unwrap_or_default(),
        m["reason"].as_str().unwrap_or_default(),
    )
}

async fn messages_respect_consent_and_reach_real_transports(backend: tessera_tests::Backend) {
    let (smtp, smtp_url) = Smtp::start().await;
    let (sms, sms_url) = SmsProvider::start().await;
    let Some(suite) = start(backend, &smtp_url, &sms_url).await else {
        return;
    };
    brand_and_templates(&suite).await;
    let mut e = eligibility::client(&suite);

    // A template that does not compile is refused with the field and the line.
    let broken = json(
        put(
            &suite,
            "/v1/templates",
            &json!({"name": "broken", "channel": "CHANNEL_EMAIL", "purpose": "MESSAGE_PURPOSE_MARKETING",
                    "subject": "Hi", "bodyText": "Hello\n{% if code %}{{ code }}"}),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(
        broken["error"]["field_violations"][0]["field"],
        "template.body_text"
    );
    assert!(
        broken["error"]["field_violations"][0]["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("line 2")),
        "{broken}"
    );

    e.define_attribute(suite.ctx(TENANT).request(epb::DefineAttributeRequest {
        idempotency_key: key(),
        attribute: Some(epb::AttributeDefinition {
            name: "referred_by".into(),
            r#type: epb::ValueType::String.into(),
        }),
    }))
    .await
    .expect("attribute");
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            id: "ada".into(),
            email: "ada@example.com".into(),
            phone: "+393331234567".into(),
            locale: "it-IT".into(),
            consents: consents(&[("marketing_email", true), ("marketing_sms", true)]),
            ..Default::default()
        },
    )
    .await;
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            id: "bob".into(),
            email: "bob@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            id: "carl".into(),
            consents: consents(&[("marketing_email", true)]),
            ..Default::default()
        },
    )
    .await;
    let friend = epb::CustomerInput {
        id: "friend".into(),
        email: "friend@example.com".into(),
        attributes: [(
            "referred_by".to_string(),
            epb::Value {
                kind: Some(epb::value::Kind::StringValue("ada".into())),
            },
        )]
        .into(),
        ..Default::default()
    };
    customer(&mut e, &suite, friend.clone()).await;
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            id: "rex".into(),
            email: "reject@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    // A bad address is refused when the profile is saved.
    let bad = e
        .upsert_customer(suite.ctx(TENANT).request(epb::UpsertCustomerRequest {
            idempotency_key: key(),
            customer: Some(epb::CustomerInput {
                id: "zed".into(),
                email: "not an address".into(),
                phone: "0039 333".into(),
                ..Default::default()
            }),
        }))
        .await
        .expect_err("bad contact details");
    assert_eq!(
        eligibility::violations(&bad),
        ["customer.email", "customer.phone"]
    );

    // Marketing with consent: the Italian template for it-IT, brand variables, HTML
    // escaped, a one-click unsubscribe header.
    let sent = send(
        &suite,
        "ada",
        "email",
        "spring",
        json!({"code": "SPRING<1>"}),
    )
    .await;
    assert_eq!(outcome(&sent), ("MESSAGE_STATUS_SENT", ""), "{sent}");
    assert_eq!(sent["recipient"], "ada@example.com");
    assert_eq!(sent["subject"], "Offerta di primavera da Acme");
    let mail = smtp.to("ada@example.com").pop().expect("ada's mail");
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Offerta di primavera da Acme")
    );
    assert!(
        mail.header("From")
            .is_some_and(|f| f.contains("rewards@acme.test"))
    );
    assert_eq!(
        mail.header("List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    let unsubscribe = mail.header("List-Unsubscribe").expect("unsubscribe link");
    let token = unsubscribe
        .split("token=")
        .nth(1)
        .expect("token")
        .trim_end_matches('>')
        .to_string();
    assert!(unsubscribe.starts_with("<https://rewards.acme.test/v1/unsubscribe?token="));
    assert!(
        mail.data.contains("Il tuo codice: SPRING<1>"),
        "{}",
        mail.data
    );

    // The default locale for someone without one, with its HTML part escaped.
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            id: "eve".into(),
            email: "eve@example.com".into(),
            consents: consents(&[("marketing_email", true)]),
            ..Default::default()
        },
    )
    .await;
    let sent = send(
        &suite,
        "eve",
        "email",
        "spring",
        json!({"code": "SPRING<2>"}),
    )
    .await;
    assert_eq!(sent["subject"], "Spring offer from Acme");
    let mail = smtp.to("eve@example.com").pop().expect("eve's mail");
    assert!(mail.data.contains("multipart/alternative"), "{}", mail.data);
    assert!(
        mail.data.contains("SPRING&lt;2&gt; for eve"),
        "{}",
        mail.data
    );
    assert!(mail.data.contains("#ff5500"), "{}", mail.data);

    // SMS through the provider: one 503 first, then accepted on the retry.
    sms.fail_first.store(1, Ordering::SeqCst);
    let sent = send(&suite, "ada", "sms", "spring", json!({"code": "SPRING-3"})).await;
    assert_eq!(outcome(&sent), ("MESSAGE_STATUS_SENT", ""));
    assert_eq!(sent["attempts"], 2);
    let texts = sms.received();
    assert_eq!(texts.len(), 2);
    assert_eq!(
        (&texts[1]["to"], &texts[1]["text"], &texts[1]["ref"]),
        (
            &json!("+393331234567"),
            &json!("Acme: code SPRING-3"),
            &sent["id"]
        )
    );

    // No consent, no address, no template, a permanent refusal.
    let skipped = send(&suite, "bob", "email", "spring", json!({"code": "X"})).await;
    assert_eq!(outcome(&skipped), ("MESSAGE_STATUS_SKIPPED", "NO_CONSENT"));
    let skipped = send(&suite, "carl", "email", "spring", json!({"code": "X"})).await;
    assert_eq!(outcome(&skipped), ("MESSAGE_STATUS_SKIPPED", "NO_ADDRESS"));
    let failed = send(&suite, "bob", "email", "nonexistent", json!({})).await;
    assert_eq!(outcome(&failed), ("MESSAGE_STATUS_FAILED", "NO_TEMPLATE"));
    let refused = send(&suite, "rex", "email", "receipt", json!({})).await;
    assert_eq!(outcome(&refused), ("MESSAGE_STATUS_FAILED", "REJECTED"));
    assert_eq!(refused["attempts"], 1, "a permanent refusal is not retried");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("550"))
    );
    // Transactional mail needs no marketing consent.
    let receipt = send(&suite, "bob", "email", "receipt", json!({})).await;
    assert_eq!(outcome(&receipt), ("MESSAGE_STATUS_SENT", ""));
    assert!(
        smtp.to("bob@example.com")[0]
            .header("List-Unsubscribe")
            .is_none()
    );

    // A referred friend gets the consent request, once, and nothing else until they agree.
    for (template, expected) in [
        ("receipt", ("MESSAGE_STATUS_SKIPPED", "NO_CONSENT")),
        ("spring", ("MESSAGE_STATUS_SKIPPED", "NO_CONSENT")),
        ("consent", ("MESSAGE_STATUS_SENT", "")),
        ("consent", ("MESSAGE_STATUS_SKIPPED", "ALREADY_ASKED")),
    ] {
        let m = send(&suite, "friend", "email", template, json!({"code": "F"})).await;
        assert_eq!(outcome(&m), expected, "{template}");
    }
    assert_eq!(smtp.to("friend@example.com").len(), 1);
    customer(
        &mut e,
        &suite,
        epb::CustomerInput {
            consents: consents(&[("marketing_email", true)]),
            ..friend
        },
    )
    .await;
    let m = send(&suite, "friend", "email", "spring", json!({"code": "F"})).await;
    assert_eq!(outcome(&m), ("MESSAGE_STATUS_SENT", ""));
    let m = send(&suite, "friend", "email", "consent", json!({})).await;
    assert_eq!(outcome(&m), ("MESSAGE_STATUS_SKIPPED", "ALREADY_ANSWERED"));

    // The unsubscribe link: GET only shows a form (link scanners), POST unsubscribes
    // without an API key; a forged token is refused.
    let page = reqwest::get(format!("{}/v1/unsubscribe?token={token}", suite.base_url))
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("method=\"post\""));
    let again = send(&suite, "ada", "email", "spring", json!({"code": "STILL"})).await;
    assert_eq!(
        outcome(&again),
        ("MESSAGE_STATUS_SENT", ""),
        "GET changed nothing"
    );
    let done = reqwest::Client::new()
        .post(format!("{}/v1/unsubscribe?token={token}", suite.base_url))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .expect("one click");
    let done = json(done, 200).await;
    assert_eq!(
        (&done["customer_id"], &done["channel"]),
        (&json!("ada"), &json!("CHANNEL_EMAIL"))
    );
    let (payload, mac) = token.split_once('.').expect("token");
    let flipped = if mac.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{payload}.{flipped}{}", &mac[1..]);
    let refused = reqwest::Client::new()
        .post(format!("{}/v1/unsubscribe?token={forged}", suite.base_url))
        .send()
        .await
        .expect("forged");
    assert_eq!(refused.status(), 400);
    let m = send(&suite, "ada", "email", "spring", json!({"code": "AFTER"})).await;
    assert_eq!(outcome(&m), ("MESSAGE_STATUS_SKIPPED", "UNSUBSCRIBED"));
    // SMS is another channel: still subscribed.
    let m = send(&suite, "ada", "sms", "spring", json!({"code": "SMS"})).await;
    assert_eq!(outcome(&m), ("MESSAGE_STATUS_SENT", ""));
    // Subscribing again (a support agent, on the customer's request).
    json(
        put(
            &suite,
            "/v1/customers/ada/subscriptions/email",
            &json!({"subscribed": true}),
        )
        .await,
        200,
    )
    .await;
    let m = send(&suite, "ada", "email", "spring", json!({"code": "BACK"})).await;
    assert_eq!(outcome(&m), ("MESSAGE_STATUS_SENT", ""));

    // The customer's delivery log, newest first, filterable.
    let log = json(suite.get("/v1/customers/ada/messages?limit=100").await, 200).await;
    let statuses: Vec<(&str, &str)> = log["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["template"].as_str().unwrap_or(""),
                m["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 6, "{statuses:?}");
    assert_eq!(statuses[0], ("spring", "MESSAGE_STATUS_SENT"));
    let skipped = json(
        suite.get("/v1/customers/ada/messages?status=skipped").await,
        200,
    )
    .await;
    assert_eq!(skipped["data"].as_array().expect("data").len(), 1);
    let bad = json(
        suite.get("/v1/customers/ada/messages?status=lost").await,
        400,
    )
    .await;
    assert_eq!(bad["error"]["field_violations"][0]["field"], "status");

    // GDPR erasure removes the customer's log.
    e.erase_customer(suite.ctx(TENANT).request(epb::EraseCustomerRequest {
        idempotency_key: key(),
        id: "bob".into(),
    }))
    .await
    .expect("erase");
    eventually(Duration::from_secs(10), "bob's log is erased", || async {
        let log = json(suite.get("/v1/customers/bob/messages").await, 200).await;
        log["data"]
            .as_array()
            .expect("data")
            .is_empty()
            .then_some(())
    })
    .await;
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}

async fn a_campaign_is_distributed_to_a_segment(backend: tessera_tests::Backend) {
    let (smtp, smtp_url) = Smtp::start().await;
    let (_sms, sms_url) = SmsProvider::start().await;
    let Some(suite) = start(backend, &smtp_url, &sms_url).await else {
        return;
    };
    brand_and_templates(&suite).await;
    json(
        put(
            &suite,
            "/v1/templates",
            &json!({"name": "incentive_issued", "channel": "CHANNEL_EMAIL",
                    "purpose": "MESSAGE_PURPOSE_MARKETING", "campaignId": "spring-sale",
                    "subject": "A gift for you", "bodyText": "Use {{ code }} before Sunday."}),
        )
        .await,
        200,
    )
    .await;
    let mut e = eligibility::client(&suite);
    let members: Vec<String> = (0..130).map(|i| format!("m{i:03}")).collect();
    e.bulk_upsert_customers(
        suite.ctx(TENANT).request(epb::BulkUpsertCustomersRequest {
            idempotency_key: key(),
            customers: members
                .iter()
                .enumerate()
                .map(|(i, id)| epb::CustomerInput {
                    id: id.clone(),
                    email: format!("{id}@example.com"),
                    // Every third member has not agreed to marketing e-mail.
                    consents: consents(&[("marketing_email", i % 3 != 0)]),
                    ..Default::default()
                })
                .collect(),
        }),
    )
    .await
    .expect("members");
    e.create_segment(suite.ctx(TENANT).request(epb::CreateSegmentRequest {
        idempotency_key: key(),
        segment: Some(epb::SegmentInput {
            id: "newsletter".into(),
            name: "Newsletter".into(),
            kind: epb::SegmentKind::Static.into(),
            rule: String::new(),
        }),
    }))
    .await
    .expect("segment");
    e.edit_static_segment(suite.ctx(TENANT).request(epb::EditStaticSegmentRequest {
        idempotency_key: key(),
        id: "newsletter".into(),
        add: members.clone(),
        remove: Vec::new(),
    }))
    .await
    .expect("members added");

    // A reward, a pool of 120 codes (ten short of the segment), a campaign issuing them by
    // e-mail.
    let reward = json(
        suite
            .post(
                "/v1/rewards",
                Some(&key()),
                &json!({"name": "Five off", "currency": "EUR",
                        "effect": {"amount_off": {"amount": 500}}}),
            )
            .await,
        201,
    )
    .await;
    let pool = json(
        suite
            .post(
                "/v1/code-pools",
                Some(&key()),
                &json!({"reward_id": reward["id"], "name": "spring", "pattern": {"pattern": "SPR-#####"}}),
            )
            .await,
        201,
    )
    .await;
    let pool_id = pool["id"].as_str().expect("pool").to_string();
    let job = json(
        suite
            .post(
                &format!("/v1/code-pools/{pool_id}/generate"),
                Some(&key()),
                &json!({"count": 120}),
            )
            .await,
        202,
    )
    .await;
    let job_id = job["id"].as_str().expect("job").to_string();
    eventually(Duration::from_secs(30), "codes generated", || async {
        let job = json(
            suite.get(&format!("/v1/code-pools/jobs/{job_id}")).await,
            200,
        )
        .await;
        (job["status"] == "JOB_STATUS_SUCCEEDED").then_some(())
    })
    .await;
    json(
        suite
            .post(
                "/v1/campaigns",
                Some(&key()),
                &json!({"id": "spring-sale", "name": "Spring sale", "type": "CAMPAIGN_TYPE_PROMOTION",
                        "incentive": {"poolId": pool_id, "channel": "email"},
                        "definition": {"effect": {"amountOff": {"amount": 500}}}}),
            )
            .await,
        201,
    )
    .await;
    // A draft is not distributed.
    let refused = json(
        suite
            .post(
                "/v1/campaigns/spring-sale/distributions",
                Some(&key()),
                &json!({"segment_id": "newsletter"}),
            )
            .await,
        422,
    )
    .await;
    assert_eq!(
        refused["error"]["reason"], "CAMPAIGN_NOT_ACTIVE",
        "{refused}"
    );
    json(
        suite
            .post("/v1/campaigns/spring-sale/start", Some(&key()), &json!({}))
            .await,
        200,
    )
    .await;
    // m000 had the incentive already (issued by hand before the send).
    json(
        suite
            .post(
                "/v1/campaigns/spring-sale/distributions",
                Some(&key()),
                &json!({"segment_id": "missing"}),
            )
            .await,
        404,
    )
    .await;
    tessera_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient::new(
        suite.channel(),
    )
    .issue_incentive(suite.ctx(TENANT).request(
        tessera_proto::scheduler::v1::IssueIncentiveRequest {
            idempotency_key: key(),
            campaign_id: "spring-sale".into(),
            customer_id: "m000".into(),
            cause: "support".into(),
        },
    ))
    .await
    .expect("issued by hand");
    let started = json(
        suite
            .post(
                "/v1/campaigns/spring-sale/distributions",
                Some(&key()),
                &json!({"segment_id": "newsletter"}),
            )
            .await,
        202,
    )
    .await;
    assert_eq!(started["state"], "DISTRIBUTION_STATE_RUNNING");
    assert_eq!(started["total"], 130);
    let id = started["id"].as_str().expect("id").to_string();
    let done = eventually(
        Duration::from_secs(60),
        "the distribution completes",
        || async {
            let d = json(suite.get(&format!("/v1/distributions/{id}")).await, 200).await;
            (d["state"] != "DISTRIBUTION_STATE_RUNNING").then_some(d)
        },
    )
    .await;
    assert_eq!(done["state"], "DISTRIBUTION_STATE_COMPLETED", "{done}");
    // 119 codes were left after m000's: 119 issued, m000 had it, 10 found the pool empty.
    assert_eq!(
        (
            &done["processed"],
            &done["issued"],
            &done["already_issued"],
            &done["failed"]
        ),
        (&json!(130), &json!(119), &json!(1), &json!(10)),
        "{done}"
    );
    assert_eq!(
        done["failures"].as_object().map(|f| f.len()),
        Some(1),
        "{done}"
    );
    // The messages it caused: the 119 issued, sent or skipped for consent.
    let summary = eventually(Duration::from_secs(60), "every message settles", || async {
        let d = json(suite.get(&format!("/v1/distributions/{id}")).await, 200).await;
        let counts = d["messages"].as_array().cloned().unwrap_or_default();
        let total: u64 = counts
            .iter()
            .map(|c| c["count"].as_u64().unwrap_or(0))
            .sum();
        let queued = counts
            .iter()
            .any(|c| c["status"] == "MESSAGE_STATUS_QUEUED");
        (total == 119 && !queued).then_some(counts)
    })
    .await;
    let count = |status: &str, reason: &str| {
        summary
            .iter()
            .find(|c| c["status"] == status && c["reason"].as_str().unwrap_or("") == reason)
            .and_then(|c| c["count"].as_u64())
            .unwrap_or(0)
    };
    let sent = count("MESSAGE_STATUS_SENT", "");
    let skipped = count("MESSAGE_STATUS_SKIPPED", "NO_CONSENT");
    assert_eq!(sent + skipped, 119, "{summary:?}");
    assert!(skipped >= 33 && sent >= 76, "{summary:?}");
    let mails = smtp.mails.lock().expect("mails").len() as u64;
    assert_eq!(mails, sent);
    let mail = smtp.mails.lock().expect("mails")[0].clone();
    assert!(mail.data.contains("Use SPR-"), "{}", mail.data);

    // The campaign's codes as CSV: customer and status of each.
    let csv = suite.get("/v1/campaigns/spring-sale/codes.csv").await;
    assert_eq!(csv.status(), 200);
    let csv = csv.text().await.expect("csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 120);
    assert!(rows.iter().all(|r| r.contains(",published,")), "{csv}");
    assert!(rows.iter().any(|r| r.contains(",m000,")), "{csv}");
    let none = json(suite.get("/v1/campaigns/nope/codes.csv").await, 404).await;
    assert_eq!(none["error"]["code"], "not_found");
    crate::check_catalogue(&suite, TENANT).await;
    suite.cleanup().await;
}
