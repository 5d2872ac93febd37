//! Transports: e-mail over SMTP (lettre, pooled connections) and SMS / push through a
//! generic HTTP provider (a POST whose JSON body is a minijinja template of the
//! deployment's configuration). Each send says whether a failure is worth retrying.

use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::json;
use tessera_proto::notification::v1 as pb;
use tessera_runtime::config::{ChannelsConfig, HttpProviderConfig};

/// A rendered message, ready for its transport.
pub struct Outgoing<'a> {
    pub id: &'a str,
    pub to: &'a str,
    pub subject: &'a str,
    pub text: &'a str,
    pub html: &'a str,
    pub brand: &'a pb::Brand,
    /// Marketing messages carry one (`List-Unsubscribe`, RFC 8058 one-click).
    pub unsubscribe_url: Option<&'a str>,
}

/// Why a send failed.
#[derive(Debug)]
pub enum SendError {
    /// The server or provider refused it for good (a 5xx SMTP reply, a 4xx HTTP answer),
    /// or the channel is not configured.
    Rejected(String),
    /// Worth another try (no connection, timeout, a 4xx SMTP reply, a 5xx or 429 answer).
    Transient(String),
}

/// The configured transports.
pub struct Transports {
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    http: reqwest::Client,
    sms: Option<HttpProviderConfig>,
    push: Option<HttpProviderConfig>,
}

impl Transports {
    pub fn new(config: &ChannelsConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(config.timeout_secs);
        let smtp = match &config.smtp_url {
            None => None,
            Some(url) => Some(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)?
                    .timeout(Some(timeout))
                    .build(),
            ),
        };
        for (name, provider) in [("sms", &config.sms), ("push", &config.push)] {
            if let Some(p) = provider {
                crate::templates::render("provider.json", &p.body, &sample())
                    .map_err(|e| anyhow::anyhow!("channels.{name}.body: {e}"))?;
            }
        }
        Ok(Self {
            smtp,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            sms: config.sms.clone(),
            push: config.push.clone(),
        })
    }

    pub async fn send(&self, channel: pb::Channel, m: &Outgoing<'_>) -> Result<(), SendError> {
        match channel {
            pb::Channel::Email => self.email(m).await,
            pb::Channel::Sms => self.provider("sms", self.sms.as_ref(), m).await,
            pb::Channel::Push => self.provider("push", self.push.as_ref(), m).await,
            pb::Channel::Unspecified => Err(SendError::Rejected("no channel".into())),
        }
    }

    async fn email(&self, m: &Outgoing<'_>) -> Result<(), SendError> {
        let Some(smtp) = &self.smtp else {
            return Err(SendError::Rejected(
                "e-mail is not configured (channels.smtp_url)".into(),
            ));
        };
        if m.brand.from_email.is_empty() {
            return Err(SendError::Rejected(
                "the brand has no from_email (PutBrand)".into(),
            ));
        }
        let from = format!("{} <{}>", m.brand.from_name, m.brand.from_email)
            .trim()
            .parse::<Mailbox>()
            .or_else(|_| m.brand.from_email.parse::<Mailbox>())
            .map_err(|e| SendError::Rejected(format!("sender: {e}")))?;
        let to =
            m.to.parse::<Mailbox>()
                .map_err(|e| SendError::Rejected(format!("recipient: {e}")))?;
        let text = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(m.text.to_string());
        let builder = lettre::Message::builder()
            .from(from)
            .to(to)
            .subject(m.subject)
            .message_id(Some(format!("<{}@tessera>", m.id)));
        let mut email = if m.html.is_empty() {
            builder.singlepart(text)
        } else {
            builder.multipart(
                MultiPart::alternative().singlepart(text).singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(m.html.to_string()),
                ),
            )
        }
        .map_err(|e| SendError::Rejected(e.to_string()))?;
        if let Some(url) = m.unsubscribe_url {
            let headers = email.headers_mut();
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{url}>"),
            ));
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".into(),
            ));
        }
        match smtp.send(email).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Rejected(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
        }
    }

    async fn provider(
        &self,
        name: &str,
        config: Option<&HttpProviderConfig>,
        m: &Outgoing<'_>,
    ) -> Result<(), SendError> {
        let Some(p) = config else {
            return Err(SendError::Rejected(format!(
                "{name} is not configured (channels.{name})"
            )));
        };
        let body = crate::templates::render(
            "provider.json",
            &p.body,
            &json!({"to": m.to, "subject": m.subject, "text": m.text, "message_id": m.id}),
        )
        .map_err(SendError::Rejected)?;
        let mut request = self
            .http
            .post(&p.url)
            .header("content-type", "application/json")
            .header("idempotency-key", m.id);
        for (k, v) in &p.headers {
            request = request.header(k, v);
        }
        match request.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status();
                let text: String = r
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                let detail = format!("{name} provider answered {status}: {text}");
                if status.is_client_error()
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                {
                    Err(SendError::Rejected(detail))
                } else {
                    Err(SendError::Transient(detail))
                }
            }
            Err(e) => Err(SendError::Transient(format!("{name} provider: {e}"))),
        }
    }
}

/// What a provider body template is checked against at start.
fn sample() -> serde_json::Value {
    json!({"to": "+10000000000", "subject": "s", "text": "t", "message_id": "m"})
}
