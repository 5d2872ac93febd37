//! Messages to customers: queued by `SendMessage`, by events (`campaign.incentive_issued`
//! and `campaign.reminder` name a channel and a template) and so by distributions; sent at
//! least once by the [`Sender`], the handler of the service's durable queue `messages`: an
//! item is pushed with each message, in its transaction, and a transient failure (the
//! provider or eligibility unreachable) is retried on the configured schedule.
//!
//! Consent is decided when a message is sent, from the customer's profile as it is then
//! (eligibility owns profiles and consents) and this service's unsubscribe list:
//! - transactional messages go to any customer with an address;
//! - marketing needs the consent `marketing_<channel>` and no unsubscribe, and carries an
//!   unsubscribe link (`List-Unsubscribe`, one-click);
//! - a consent request goes only to a customer who has not answered on that channel, once;
//! - a referred friend (`referred_by` set) who has not agreed gets nothing but the consent
//!   request.
//!
//! Every outcome stays in the customer's log: SENT, SKIPPED with the reason, or FAILED.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::Rng;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Value};
use serde_json::json;
use sha2::Sha256;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::notification::v1 as pb;
use tessera_runtime::config::ChannelsConfig;
use tessera_runtime::sealing::Keyring;
use tessera_runtime::{Code, Error, RequestContext, grpc};
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::{
    self, Failure, Handler, Item, NewItem, Queue, RetryPolicy, Worker, WorkerConfig, push,
};
use tessera_store::{Db, db_error, insert_rows, now_micros, stmt};

use crate::channels::{Outgoing, SendError, Transports};
use crate::templates;

/// A message to queue.
pub struct NewMessage {
    pub customer_id: String,
    pub channel: pb::Channel,
    pub template: String,
    pub campaign_id: String,
    pub cause: String,
    pub variables: serde_json::Value,
    /// Unique per tenant: a second message with the same key is not queued.
    pub dedupe_key: String,
}

/// The lower-case channel name (`email`), as consents and events spell it.
pub fn channel_name(c: pb::Channel) -> &'static str {
    match c {
        pb::Channel::Email => "email",
        pb::Channel::Sms => "sms",
        pb::Channel::Push => "push",
        pb::Channel::Unspecified => "",
    }
}

pub fn channel_from(name: &str) -> pb::Channel {
    match name {
        "email" => pb::Channel::Email,
        "sms" => pb::Channel::Sms,
        "push" => pb::Channel::Push,
        _ => pb::Channel::Unspecified,
    }
}

fn status_name(s: pb::MessageStatus) -> &'static str {
    match s {
        pb::MessageStatus::Sent => "sent",
        pb::MessageStatus::Skipped => "skipped",
        pb::MessageStatus::Failed => "failed",
        _ => "queued",
    }
}

fn status_from(s: &str) -> pb::MessageStatus {
    match s {
        "sent" => pb::MessageStatus::Sent,
        "skipped" => pb::MessageStatus::Skipped,
        "failed" => pb::MessageStatus::Failed,
        _ => pb::MessageStatus::Queued,
    }
}

/// Queues messages (skipping those whose dedupe key is taken); returns them as stored.
pub async fn queue(
    txn: &DatabaseTransaction,
    tenant: &str,
    messages: Vec<NewMessage>,
    now: i64,
) -> Result<u64, Error> {
    let mut written = 0;
    let ids: Vec<String> = messages.iter().map(|_| new_id()).collect();
    let rows: Vec<Vec<Value>> = messages
        .into_iter()
        .zip(&ids)
        .map(|(m, id)| {
            vec![
                id.clone().into(),
                tenant.into(),
                m.customer_id.into(),
                (m.channel as i32).into(),
                m.template.into(),
                m.campaign_id.into(),
                m.cause.into(),
                serde_json::to_vec(&m.variables).unwrap_or_default().into(),
                m.dedupe_key.into(),
                now.into(),
            ]
        })
        .collect();
    for chunk in rows.chunks(500) {
        written += insert_rows(
            txn,
            "INSERT INTO messages (id, tenant_id, customer_id, channel, template, campaign_id, \
             cause, variables, dedupe_key, created_at)",
            "ON CONFLICT (tenant_id, dedupe_key) DO NOTHING",
            chunk.to_vec(),
        )
        .await?;
    }
    // An item per message; one whose row was not written (its dedupe key was taken) finds
    // nothing to send.
    push(txn, ids.iter().map(|id| work(tenant, id))).await?;
    Ok(written)
}

/// The queue messages wait in.
const QUEUE: &str = "messages";

/// What a message's item is.
const KIND: &str = "notification.message";

/// The queue item that sends message `id`.
fn work(tenant: &str, id: &str) -> NewItem {
    NewItem::for_row(QUEUE, KIND, tenant, id)
}

/// Puts queued messages without a queue item (queued before messages used the queue) on
/// the queue; returns how many were new.
pub async fn adopt_queued(db: &Db) -> Result<u64, Error> {
    let sql = "SELECT tenant_id, id FROM messages WHERE status = 'queued'";
    queue::adopt(db, sql, Vec::new(), QUEUE, KIND).await
}

/// Message ids grow with time (the list's cursor).
pub fn new_id() -> String {
    format!("mes_{}", uuid::Uuid::now_v7().simple())
}

/// Messages events ask for: an issued incentive on a message channel (template
/// `incentive_issued`) and a reminder (its template).
pub fn from_event(event_id: &str, event_type: &str, data: &[u8]) -> Option<NewMessage> {
    if event_type != "campaign.incentive_issued" && event_type != "campaign.reminder" {
        return None;
    }
    let data: serde_json::Value = serde_json::from_slice(data).ok()?;
    let channel = channel_from(data["channel"].as_str()?);
    if channel == pb::Channel::Unspecified {
        return None;
    }
    let template = if event_type == "campaign.reminder" {
        data["template"].as_str()?.to_string()
    } else {
        "incentive_issued".to_string()
    };
    let cause = match data["cause"].as_str() {
        Some(c) if c.starts_with("distribution:") => c.to_string(),
        _ => format!("event:{event_id}"),
    };
    Some(NewMessage {
        customer_id: data["customer_id"].as_str()?.to_string(),
        channel,
        template,
        campaign_id: data["campaign_id"].as_str().unwrap_or_default().to_string(),
        cause,
        variables: json!({
            "code": data["code"],
            "publication_id": data["publication_id"],
            "step": data["step"],
        }),
        dedupe_key: format!("event:{event_id}"),
    })
}

/// GDPR erasure: the customer's messages and unsubscribes go.
pub async fn erase(txn: &DatabaseTransaction, tenant: &str, customer: &str) -> Result<(), Error> {
    for table in ["messages", "subscriptions"] {
        txn.execute_raw(stmt(
            txn,
            &format!("DELETE FROM {table} WHERE tenant_id = $1 AND customer_id = $2"),
            [tenant.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

const COLUMNS: &str = "id, customer_id, channel, template, campaign_id, cause, status, reason, \
                       detail, purpose, recipient, subject, attempts, created_at, finished_at";

fn decode(row: &sea_orm::QueryResult) -> Result<pb::Message, Error> {
    let get = || -> Result<pb::Message, sea_orm::DbErr> {
        let status: String = row.try_get_by_index(6)?;
        let finished: i64 = row.try_get_by_index(14)?;
        let mut m = pb::Message {
            id: row.try_get_by_index(0)?,
            customer_id: row.try_get_by_index(1)?,
            channel: row.try_get_by_index(2)?,
            template: row.try_get_by_index(3)?,
            campaign_id: row.try_get_by_index(4)?,
            cause: row.try_get_by_index(5)?,
            reason: row.try_get_by_index(7)?,
            detail: row.try_get_by_index(8)?,
            purpose: row.try_get_by_index(9)?,
            recipient: row.try_get_by_index(10)?,
            subject: row.try_get_by_index(11)?,
            attempts: row.try_get_by_index(12)?,
            created_at: Some(micros_to_timestamp(row.try_get_by_index(13)?)),
            finished_at: (finished > 0).then(|| micros_to_timestamp(finished)),
            ..Default::default()
        };
        m.set_status(status_from(&status));
        Ok(m)
    };
    get().map_err(db_error)
}

/// The message queued under `dedupe_key`.
pub async fn by_key<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    key: &str,
) -> Result<pb::Message, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM messages WHERE tenant_id = $1 AND dedupe_key = $2"),
            [tenant.into(), key.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("queued message vanished"))?;
    decode(&row)
}

/// A page of messages, newest first, of a customer or a cause.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    r: &pb::ListMessagesRequest,
    before: &str,
    limit: u32,
) -> Result<(Vec<pb::Message>, bool), Error> {
    let mut values: Vec<Value> = vec![tenant.into(), i64::from(limit + 1).into()];
    let status = if r.status() == pb::MessageStatus::Unspecified {
        ""
    } else {
        status_name(r.status())
    };
    let filter = crate::and_given(
        &mut values,
        &[
            ("customer_id =", r.customer_id.as_str()),
            ("cause =", r.cause.as_str()),
            ("status =", status),
            ("id <", before),
        ],
    );
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM messages WHERE tenant_id = $1{filter} \
                 ORDER BY id DESC LIMIT $2"
            ),
            values,
        ))
        .await
        .map_err(db_error)?;
    let mut out = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

/// A cause's messages counted by state and reason.
pub async fn summarize<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    cause: &str,
) -> Result<Vec<pb::MessageCount>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT status, reason, COUNT(*) FROM messages WHERE tenant_id = $1 AND cause = $2 \
             GROUP BY status, reason ORDER BY status, reason",
            [tenant.into(), cause.into()],
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|r| {
            let status: String = r.try_get_by_index(0).map_err(db_error)?;
            let count: i64 = r.try_get_by_index(2).map_err(db_error)?;
            let mut c = pb::MessageCount {
                reason: r.try_get_by_index(1).map_err(db_error)?,
                count: u64::try_from(count).unwrap_or_default(),
                ..Default::default()
            };
            c.set_status(status_from(&status));
            Ok(c)
        })
        .collect()
}

/// Records a subscription choice.
pub async fn set_subscription(
    txn: &DatabaseTransaction,
    tenant: &str,
    customer: &str,
    channel: pb::Channel,
    subscribed: bool,
    now: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO subscriptions (tenant_id, customer_id, channel, subscribed, updated_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, customer_id, channel) \
         DO UPDATE SET subscribed = excluded.subscribed, updated_at = excluded.updated_at",
        [
            tenant.into(),
            customer.into(),
            (channel as i32).into(),
            i32::from(subscribed).into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn unsubscribed<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer: &str,
    channel: pb::Channel,
) -> Result<bool, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT subscribed FROM subscriptions WHERE tenant_id = $1 AND customer_id = $2 \
             AND channel = $3",
            [tenant.into(), customer.into(), (channel as i32).into()],
        ))
        .await
        .map_err(db_error)?;
    Ok(match row {
        Some(r) => r.try_get_by_index::<i32>(0).map_err(db_error)? == 0,
        None => false,
    })
}

/// Signs and reads unsubscribe tokens: `base64url(tenant \n customer \n channel)` `.`
/// `base64url(HMAC-SHA256)`, keyed by a secret kept in the database (every replica signs
/// alike).
#[derive(Clone)]
pub struct Tokens {
    key: Arc<Vec<u8>>,
}

impl Tokens {
    /// Loads the signing key, creating it on first start.
    /// The unsubscribe key, made on first use; stored sealed (one written before sealing, or
    /// under a retired master key, is sealed again under the current one).
    pub async fn load(db: &Db, keyring: &Keyring) -> Result<Self, Error> {
        let conn = db.conn();
        let mut fresh = [0u8; 32];
        rand::rng().fill(&mut fresh);
        let sealed = keyring.seal(&fresh, UNSUBSCRIBE_CONTEXT);
        conn.execute_raw(stmt(
            conn,
            "INSERT INTO notification_secrets (name, value) VALUES ('unsubscribe', $1) \
             ON CONFLICT (name) DO NOTHING",
            [sealed.into_bytes().into()],
        ))
        .await
        .map_err(db_error)?;
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT value FROM notification_secrets WHERE name = 'unsubscribe'",
                [],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::internal("unsubscribe key missing"))?;
        let stored: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
        let key = match String::from_utf8(stored.clone()) {
            Ok(text) if text.starts_with("sealed:") => {
                let key = keyring.open(&text, UNSUBSCRIBE_CONTEXT)?;
                if let Some(rewrapped) = keyring.rewrap(&text, UNSUBSCRIBE_CONTEXT)? {
                    store_if_unchanged(db, &stored, rewrapped.into_bytes()).await?;
                }
                key
            }
            // Raw bytes, from before secrets were sealed.
            _ => {
                let sealed = keyring.seal(&stored, UNSUBSCRIBE_CONTEXT);
                store_if_unchanged(db, &stored, sealed.into_bytes()).await?;
                stored
            }
        };
        Ok(Self { key: Arc::new(key) })
    }

    fn mac(&self, payload: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }

    pub fn sign(&self, tenant: &str, customer: &str, channel: pb::Channel) -> String {
        let payload = format!("{tenant}\n{customer}\n{}", channel_name(channel));
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()))
        )
    }

    /// (tenant, customer, channel) of a genuine token.
    pub fn verify(&self, token: &str) -> Option<(String, String, pb::Channel)> {
        let (payload, mac) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let mut check = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        check.update(&payload);
        check.verify_slice(&mac).ok()?;
        let text = String::from_utf8(payload).ok()?;
        let mut parts = text.splitn(3, '\n');
        let (tenant, customer, channel) = (parts.next()?, parts.next()?, parts.next()?);
        Some((tenant.into(), customer.into(), channel_from(channel)))
    }
}

/// What the sealed unsubscribe key is bound to.
const UNSUBSCRIBE_CONTEXT: &str = "notification-secret\nunsubscribe";

/// Replaces the stored unsubscribe key's form, unless another replica did meanwhile.
async fn store_if_unchanged(db: &Db, was: &[u8], new: Vec<u8>) -> Result<(), Error> {
    let conn = db.conn();
    conn.execute_raw(stmt(
        conn,
        "UPDATE notification_secrets SET value = $2 WHERE name = 'unsubscribe' AND value = $1",
        [was.to_vec().into(), new.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// A claimed message.
struct Claimed {
    id: String,
    tenant: String,
    customer: String,
    channel: pb::Channel,
    template: String,
    campaign: String,
    variables: Vec<u8>,
    attempts: i32,
}

/// How an attempt ended.
struct Settled {
    status: pb::MessageStatus,
    reason: &'static str,
    detail: String,
    purpose: i32,
    recipient: String,
    subject: String,
}

impl Settled {
    fn skipped(reason: &'static str, purpose: pb::MessagePurpose) -> Self {
        Self {
            status: pb::MessageStatus::Skipped,
            reason,
            detail: String::new(),
            purpose: purpose as i32,
            recipient: String::new(),
            subject: String::new(),
        }
    }

    fn failed(reason: &'static str, detail: String) -> Self {
        Self {
            status: pb::MessageStatus::Failed,
            reason,
            detail,
            purpose: 0,
            recipient: String::new(),
            subject: String::new(),
        }
    }
}

/// Sends messages: the handler of the `messages` queue.
pub struct Sender {
    db: Db,
    config: ChannelsConfig,
    transports: Arc<Transports>,
    eligibility: EligibilityServiceClient<grpc::Channel>,
    tokens: Tokens,
    policy: RetryPolicy,
}

/// Messages sent at once by one process.
const CONCURRENCY: usize = 16;

impl Sender {
    /// The worker that sends `db`'s messages.
    pub fn worker(
        db: Db,
        service: &'static str,
        config: ChannelsConfig,
        eligibility: EligibilityServiceClient<grpc::Channel>,
        tokens: Tokens,
    ) -> anyhow::Result<Worker> {
        let policy = RetryPolicy::scheduled(&config.retry_schedule_secs);
        let queue = Queue::new(db.clone(), service, QUEUE, policy.clone());
        // A claim lasts while its messages go out, CONCURRENCY at a time, each within the
        // transport's timeout, and their outcomes are written.
        let rounds = u64::from(config.batch_size)
            .div_ceil(CONCURRENCY as u64)
            .max(1);
        let worker_config = WorkerConfig {
            batch: config.batch_size,
            concurrency: CONCURRENCY,
            lease: Duration::from_secs(rounds * (config.timeout_secs + 5)),
            poll: Duration::from_millis(250),
        };
        let sender = Self {
            db,
            transports: Arc::new(Transports::new(&config)?),
            config,
            eligibility,
            tokens,
            policy,
        };
        Ok(Worker::new(queue, Arc::new(sender), worker_config))
    }

    /// The message, while it is still queued.
    async fn load(&self, tenant: &str, id: &str) -> Result<Option<Claimed>, Error> {
        let conn = self.db.conn();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT id, tenant_id, customer_id, channel, template, campaign_id, variables, \
                 attempts FROM messages WHERE tenant_id = $1 AND id = $2 AND status = 'queued'",
                [tenant.into(), id.into()],
            ))
            .await
            .map_err(db_error)?;
        let Some(r) = row else {
            return Ok(None);
        };
        let claimed = (|| {
            let channel: i32 = r.try_get_by_index(3)?;
            Ok::<_, sea_orm::DbErr>(Claimed {
                id: r.try_get_by_index(0)?,
                tenant: r.try_get_by_index(1)?,
                customer: r.try_get_by_index(2)?,
                channel: pb::Channel::try_from(channel).unwrap_or_default(),
                template: r.try_get_by_index(4)?,
                campaign: r.try_get_by_index(5)?,
                variables: r.try_get_by_index(6)?,
                attempts: r.try_get_by_index(7)?,
            })
        })()
        .map_err(db_error)?;
        Ok(Some(claimed))
    }
}

#[async_trait::async_trait]
impl Handler for Sender {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        let id = String::from_utf8_lossy(&item.payload);
        let retry = |e: Error| Failure::Retry(e.message);
        let Some(c) = self.load(&item.tenant, &id).await.map_err(retry)? else {
            // Sent or settled already, or never written (its dedupe key was taken).
            return Ok(());
        };
        let outcome = self.attempt(&c).await;
        let last = item.attempts >= self.policy.max_attempts;
        let transient = outcome.as_ref().err().cloned();
        self.settle(&c, outcome, last).await.map_err(retry)?;
        match transient {
            Some(detail) if !last => Err(Failure::Retry(detail)),
            _ => Ok(()),
        }
    }
}

impl Sender {
    /// Decides, renders and sends one message. `Err` is a transient failure.
    async fn attempt(&self, c: &Claimed) -> Result<Settled, String> {
        let ctx = RequestContext::system(c.tenant.clone(), crate::SERVICE);
        let profile = match self
            .eligibility
            .clone()
            .get_customer(ctx.request(epb::GetCustomerRequest {
                id: c.customer.clone(),
            }))
            .await
        {
            Ok(r) => r
                .into_inner()
                .customer
                .and_then(|c| c.profile)
                .unwrap_or_default(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Settled::failed("CUSTOMER_NOT_FOUND", s.message().into()));
            }
            Err(s) => return Err(format!("eligibility: {}", s.message())),
        };
        let conn = self.db.conn();
        let db = |e: Error| e.message;
        let Some(template) = templates::resolve(
            conn,
            &c.tenant,
            &c.template,
            c.channel,
            &c.campaign,
            &profile.locale,
        )
        .await
        .map_err(db)?
        else {
            return Ok(Settled::failed(
                "NO_TEMPLATE",
                format!(
                    "no {} template `{}` for this campaign or the tenant",
                    channel_name(c.channel),
                    c.template
                ),
            ));
        };
        let purpose = template.purpose();
        if let Some(reason) = self.refusal(c, &profile, purpose).await.map_err(db)? {
            return Ok(Settled::skipped(reason, purpose));
        }
        let to = match c.channel {
            pb::Channel::Email => &profile.email,
            pb::Channel::Sms => &profile.phone,
            _ => &profile.push_token,
        };
        if to.is_empty() {
            return Ok(Settled::skipped("NO_ADDRESS", purpose));
        }
        let brand = templates::brand(conn, &c.tenant).await.map_err(db)?;
        let unsubscribe_url = (purpose == pb::MessagePurpose::Marketing).then(|| {
            format!(
                "{}/v1/unsubscribe?token={}",
                self.config.public_url.trim_end_matches('/'),
                self.tokens.sign(&c.tenant, &c.customer, c.channel)
            )
        });
        let context = render_context(c, &profile, &brand, unsubscribe_url.as_deref());
        let mut parts = Vec::new();
        for (field, source) in [
            ("subject", &template.subject),
            ("body_text", &template.body_text),
            ("body_html", &template.body_html),
        ] {
            match templates::render(&templates::part_name(field), source, &context) {
                Ok(text) => parts.push(text),
                Err(e) => {
                    let mut s = Settled::failed("RENDER_FAILED", e);
                    s.purpose = purpose as i32;
                    return Ok(s);
                }
            }
        }
        let outgoing = Outgoing {
            id: &c.id,
            to,
            subject: parts[0].trim(),
            text: &parts[1],
            html: &parts[2],
            brand: &brand,
            unsubscribe_url: unsubscribe_url.as_deref(),
        };
        let mut settled = Settled {
            status: pb::MessageStatus::Sent,
            reason: "",
            detail: String::new(),
            purpose: purpose as i32,
            recipient: to.clone(),
            subject: parts[0].trim().to_string(),
        };
        match self.transports.send(c.channel, &outgoing).await {
            Ok(()) => Ok(settled),
            Err(SendError::Rejected(detail)) => {
                settled.status = pb::MessageStatus::Failed;
                settled.reason = "REJECTED";
                settled.detail = detail;
                Ok(settled)
            }
            Err(SendError::Transient(detail)) => Err(detail),
        }
    }

    /// Why this customer may not get a message of this purpose now, if they may not.
    async fn refusal(
        &self,
        c: &Claimed,
        profile: &epb::CustomerInput,
        purpose: pb::MessagePurpose,
    ) -> Result<Option<&'static str>, Error> {
        let conn = self.db.conn();
        let consent = profile
            .consents
            .get(&format!("marketing_{}", channel_name(c.channel)))
            .copied();
        let referred = profile
            .attributes
            .get("referred_by")
            .is_some_and(|v| match &v.kind {
                Some(epb::value::Kind::StringValue(s)) => !s.is_empty(),
                other => other.is_some(),
            });
        Ok(match purpose {
            pb::MessagePurpose::ConsentRequest => {
                if consent.is_some() {
                    Some("ALREADY_ANSWERED")
                } else if unsubscribed(conn, &c.tenant, &c.customer, c.channel).await? {
                    Some("UNSUBSCRIBED")
                } else if self.asked(c).await? {
                    Some("ALREADY_ASKED")
                } else {
                    None
                }
            }
            pb::MessagePurpose::Marketing => {
                if consent != Some(true) {
                    Some("NO_CONSENT")
                } else if unsubscribed(conn, &c.tenant, &c.customer, c.channel).await? {
                    Some("UNSUBSCRIBED")
                } else {
                    None
                }
            }
            _ => (referred && consent != Some(true)).then_some("NO_CONSENT"),
        })
    }

    /// Whether the customer was already sent a consent request on this channel.
    async fn asked(&self, c: &Claimed) -> Result<bool, Error> {
        let conn = self.db.conn();
        Ok(conn
            .query_one_raw(stmt(
                conn,
                "SELECT 1 FROM messages WHERE tenant_id = $1 AND customer_id = $2 \
                 AND channel = $3 AND purpose = $4 AND status = 'sent' AND id <> $5 LIMIT 1",
                [
                    c.tenant.clone().into(),
                    c.customer.clone().into(),
                    (c.channel as i32).into(),
                    (pb::MessagePurpose::ConsentRequest as i32).into(),
                    c.id.clone().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .is_some())
    }

    /// Records an attempt's outcome; a transient failure leaves the message queued (the
    /// queue retries it) unless it was the `last` attempt.
    async fn settle(
        &self,
        c: &Claimed,
        outcome: Result<Settled, String>,
        last: bool,
    ) -> Result<(), Error> {
        let now = now_micros();
        let attempts = c.attempts + 1;
        let s = match outcome {
            Ok(s) => s,
            Err(detail) if last => Settled::failed("RETRIES_EXHAUSTED", detail),
            Err(detail) => {
                let mut s = Settled::failed("", detail);
                s.status = pb::MessageStatus::Queued;
                s
            }
        };
        let finished = if s.status == pb::MessageStatus::Queued {
            0
        } else {
            now
        };
        let conn = self.db.conn();
        // Only while it is queued: a slower attempt of a claim that lapsed does not write
        // over an outcome.
        let updated = conn
            .execute_raw(stmt(
                conn,
                "UPDATE messages SET status = $3, reason = $4, detail = $5, purpose = $6, \
                 recipient = $7, subject = $8, attempts = $9, finished_at = $10 \
                 WHERE tenant_id = $1 AND id = $2 AND status = 'queued'",
                [
                    c.tenant.clone().into(),
                    c.id.clone().into(),
                    status_name(s.status).into(),
                    s.reason.into(),
                    s.detail.chars().take(1000).collect::<String>().into(),
                    s.purpose.into(),
                    s.recipient.into(),
                    s.subject.into(),
                    attempts.into(),
                    finished.into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        if updated == 0 {
            return Err(Error::new(
                Code::Aborted,
                "the message was settled meanwhile",
            ));
        }
        metrics::counter!("tessera_messages_total", "channel" => channel_name(c.channel), "status" => status_name(s.status))
            .increment(1);
        Ok(())
    }
}

/// What a template sees.
fn render_context(
    c: &Claimed,
    profile: &epb::CustomerInput,
    brand: &pb::Brand,
    unsubscribe_url: Option<&str>,
) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = profile
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect();
    let mut brand_vars: serde_json::Map<String, serde_json::Value> = brand
        .variables
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    brand_vars.insert("name".into(), brand.name.clone().into());
    brand_vars.insert("from_email".into(), brand.from_email.clone().into());
    let mut context = json!({
        "customer": {
            "id": c.customer,
            "email": profile.email,
            "phone": profile.phone,
            "locale": profile.locale,
            "country": profile.country,
            "city": profile.city,
            "attributes": attributes,
        },
        "brand": brand_vars,
        "campaign_id": c.campaign,
        "message_id": c.id,
    });
    if let Some(url) = unsubscribe_url {
        context["unsubscribe_url"] = url.into();
    }
    // The message's own variables, beside (never over) the ones above.
    if let Ok(serde_json::Value::Object(vars)) = serde_json::from_slice(&c.variables) {
        for (k, v) in vars {
            if context.get(&k).is_none() && !v.is_null() {
                context[k] = v;
            }
        }
    }
    context
}

fn value_json(v: &epb::Value) -> serde_json::Value {
    use epb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s) | Kind::DateValue(s)) => s.clone().into(),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::ListValue(l)) => l.values.clone().into(),
        None => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsubscribe_tokens_are_signed() {
        let tokens = Tokens {
            key: Arc::new(b"0123456789abcdef0123456789abcdef".to_vec()),
        };
        let t = tokens.sign("acme", "cust-1", pb::Channel::Email);
        assert_eq!(
            tokens.verify(&t),
            Some(("acme".into(), "cust-1".into(), pb::Channel::Email))
        );
        // Another customer's payload under this signature is refused.
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(b"acme\ncust-2\nemail"),
            t.split_once('.').expect("dot").1
        );
        assert_eq!(tokens.verify(&forged), None);
    }
}
