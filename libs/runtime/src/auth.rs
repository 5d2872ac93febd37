//! Who may call a gRPC service: every call is authenticated before it reaches a handler.
//!
//! Two kinds of caller (the decision and its limits are in `docs/security.md`):
//!
//! * **A tenant's own services** send an API key in `authorization` (`Bearer tsk_…`), the
//!   same keys the gateway takes. The key decides tenant, principal and role: whatever the
//!   caller wrote in the `x-tessera-*` metadata is thrown away and replaced.
//! * **The suite's own services** (the gateway, the command relay, scheduled jobs) sign the
//!   context they send with the suite's shared secret ([`SIGNATURE_HEADER`]: HMAC-SHA256 of
//!   tenant, principal, role and request id, valid for five minutes). A tenant's key cannot
//!   produce that signature, so it cannot claim another tenant or the `system` role.
//!
//! Anything else — no credentials, an unknown key, a forged or expired signature, context
//! metadata without a signature — is refused with UNAUTHENTICATED. Health checks (probes)
//! and reflection (schemas only; `grpcurl` lists services without a key) are open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::context::{PRINCIPAL_HEADER, REQUEST_ID_HEADER, ROLE_HEADER, TENANT_HEADER};
use crate::error::{Code, Error};

/// Metadata carrying the suite's signature over the context of an internal call.
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";
/// How long a signature is accepted after it was made.
const SIGNATURE_TTL_SECS: i64 = 300;
/// Clock skew tolerated between pods for a signature dated in the future.
const MAX_SKEW_SECS: i64 = 60;
/// Shortest shared secret accepted from configuration.
pub const MIN_SECRET_LEN: usize = 32;

static SECRET: OnceLock<Vec<u8>> = OnceLock::new();

/// Installs the suite's shared secret for this process: the configured one, or (when every
/// service runs in this one process, as `tessera up`) a random one no other process knows.
/// A process holds one secret; a second, different configured secret is an error.
pub fn install_secret(configured: Option<&str>) -> Result<(), Error> {
    let wanted = configured.map(|s| s.as_bytes().to_vec());
    let installed = SECRET.get_or_init(|| {
        wanted.clone().unwrap_or_else(|| {
            let mut bytes = vec![0u8; 32];
            rand::fill(&mut bytes[..]);
            bytes
        })
    });
    match wanted {
        Some(w) if w != *installed => Err(Error::new(
            Code::FailedPrecondition,
            "this process already runs with a different internal secret",
        )),
        _ => Ok(()),
    }
}

fn secret() -> &'static [u8] {
    // A process that never installed one (a test client, a tool) gets a random secret, so
    // what it signs is refused by any suite it did not start.
    let _ = install_secret(None);
    SECRET.get().map(Vec::as_slice).unwrap_or_default()
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn mac(tenant: &str, principal: &str, role: &str, request_id: &str, at: i64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret()).expect("HMAC takes any key length");
    for part in [tenant, principal, role, request_id, &at.to_string()] {
        // Length-prefixed, so no two contexts share a signed string.
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    mac
}

/// The signature of a context, as [`SIGNATURE_HEADER`] carries it: `v1.<unix time>.<mac>`.
pub fn sign(tenant: &str, principal: &str, role: &str, request_id: &str) -> String {
    let at = now_secs();
    let tag = mac(tenant, principal, role, request_id, at)
        .finalize()
        .into_bytes();
    format!(
        "v1.{at}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
    )
}

/// Checks the signature in `metadata` against the context it carries.
pub fn verify_signature(metadata: &MetadataMap) -> Result<(), Error> {
    let get = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let refused = |why: &str| Error::new(Code::Unauthenticated, why.to_string());
    let mut parts = get(SIGNATURE_HEADER).splitn(3, '.');
    let (Some("v1"), Some(at), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refused("malformed service signature"));
    };
    let at: i64 = at
        .parse()
        .map_err(|_| refused("malformed service signature"))?;
    let age = now_secs() - at;
    if !(-MAX_SKEW_SECS..=SIGNATURE_TTL_SECS).contains(&age) {
        return Err(refused("expired service signature"));
    }
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| refused("malformed service signature"))?;
    mac(
        get(TENANT_HEADER),
        get(PRINCIPAL_HEADER),
        get(ROLE_HEADER),
        get(REQUEST_ID_HEADER),
        at,
    )
    .verify_slice(&tag)
    .map_err(|_| refused("invalid service signature"))
}

/// The tenant, principal and role an API key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    pub tenant_id: String,
    pub key_id: String,
    pub role: String,
}

/// Resolves API keys: the gateway's key store in one process, or the gateway over HTTP for
/// a service running alone ([`RemoteKeys`]).
pub trait KeyVerifier: Send + Sync + 'static {
    /// The key's identity, None for an unknown or revoked key.
    fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyIdentity>, Error>>;
}

/// Asks the gateway who a key is (`GET /v1/auth/self`), keeping answers for
/// [`RemoteKeys::TTL`] (a revoked key stops working on a lone service within that time).
pub struct RemoteKeys {
    url: String,
    http: reqwest::Client,
    /// By the key's SHA-256: when the answer came, and what it was.
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

type Cached = (Instant, Option<KeyIdentity>);

impl RemoteKeys {
    pub const TTL: Duration = Duration::from_secs(30);
    const MAX_CACHED: usize = 10_000;

    pub fn new(gateway_url: &str, timeout: Duration) -> Self {
        Self {
            url: format!("{}/v1/auth/self", gateway_url.trim_end_matches('/')),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn ask(&self, key: &str) -> Result<Option<KeyIdentity>, Error> {
        let response = self
            .http
            .get(&self.url)
            .bearer_auth(key)
            .send()
            .await
            .map_err(|e| Error::unavailable(format!("the gateway cannot check keys: {e}")))?;
        match response.status().as_u16() {
            200 => {}
            401 => return Ok(None),
            status => {
                return Err(Error::unavailable(format!(
                    "the gateway answered {status} checking a key"
                )));
            }
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| Error::unavailable(format!("the gateway's key answer: {e}")))?;
        let field = |name: &str| body[name].as_str().unwrap_or_default().to_string();
        Ok(Some(KeyIdentity {
            tenant_id: field("tenant_id"),
            key_id: field("key_id"),
            role: field("role"),
        }))
    }
}

impl KeyVerifier for RemoteKeys {
    fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyIdentity>, Error>> {
        Box::pin(async move {
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            if let Some((at, identity)) = self.cache.lock().expect("cache").get(&digest)
                && at.elapsed() < Self::TTL
            {
                return Ok(identity.clone());
            }
            let identity = self.ask(key).await?;
            let mut cache = self.cache.lock().expect("cache");
            if cache.len() >= Self::MAX_CACHED {
                cache.retain(|_, (at, _)| at.elapsed() < Self::TTL);
                if cache.len() >= Self::MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(digest, (Instant::now(), identity.clone()));
            Ok(identity)
        })
    }
}

/// Authenticates every call before the routes see it (see the module docs).
#[derive(Clone)]
pub struct AuthLayer {
    keys: Option<Arc<dyn KeyVerifier>>,
}

impl AuthLayer {
    /// `keys`: how API keys are resolved; None refuses keys (only the suite's own calls).
    pub fn new(keys: Option<Arc<dyn KeyVerifier>>) -> Self {
        Self { keys }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    keys: Option<Arc<dyn KeyVerifier>>,
}

/// Which roles an API key needs to call a method over gRPC: the same split as the gateway's
/// routes. Methods not listed (the suite's own plumbing: code sync, batch postings, sweeps,
/// event intake) take no API key at all, only the suite's signed calls. A key's role is
/// checked here and again by handlers that check roles themselves.
fn roles_for(path: &str) -> Option<&'static [&'static str]> {
    const ALL: &[&str] = &[
        "admin",
        "marketer",
        "junior_marketer",
        "support_agent",
        "touchpoint",
        "analyst",
    ];
    const ADMINS: &[&str] = &["admin"];
    const AUTHORS: &[&str] = &["admin", "marketer", "junior_marketer"];
    const MARKETERS: &[&str] = &["admin", "marketer"];
    const AGENTS: &[&str] = &["admin", "support_agent"];
    const TOUCHPOINTS: &[&str] = &["admin", "touchpoint"];
    const ASKERS: &[&str] = &["admin", "marketer", "support_agent", "touchpoint"];
    const VALUE_MOVERS: &[&str] = &["admin", "support_agent", "touchpoint"];
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let reads = |m: &str| {
        ["Get", "List", "Export", "Summarize", "Preview", "Check"]
            .iter()
            .any(|p| m.starts_with(p))
    };
    Some(match (service, method) {
        ("tessera.ops.v1.QueueService", _) => ADMINS,
        ("tessera.ops.v1.PrivacyService", _) => ADMINS,
        ("tessera.ops.v1.ErasureService", _) => ADMINS,
        (_, m) if reads(m) => ALL,
        ("tessera.catalog.v1.CatalogService", m) => match m {
            "CreateReward" | "UpdateReward" | "SetRewardStatus" | "CreateCodePool"
            | "UpdateCodePool" | "SetCodePoolStatus" | "GenerateCodes" | "ImportCodes"
            | "SetCodeStatus" => AUTHORS,
            "PublishReward" => &["admin", "marketer", "support_agent", "touchpoint"],
            "MarkShown" => TOUCHPOINTS,
            "PutAccessPolicy" => ADMINS,
            _ => return None,
        },
        ("tessera.eligibility.v1.EligibilityService", m) => match m {
            "PutSettings" | "DefineAttribute" | "PutEventSchema" => ADMINS,
            "UpsertCustomer"
            | "BulkUpsertCustomers"
            | "RecordOrder"
            | "RecordEvent"
            | "Validate"
            | "Redeem"
            | "Reserve"
            | "Confirm"
            | "RollbackRedemption" => TOUCHPOINTS,
            "EraseCustomer" => AGENTS,
            "Qualify" => ASKERS,
            "CreateSegment" | "UpdateSegment" | "EditStaticSegment" | "RecomputeSegment" => AUTHORS,
            _ => return None,
        },
        ("tessera.wallet.v1.WalletService", m) => match m {
            "Credit" | "Debit" | "Hold" | "Capture" | "Release" | "Reverse" | "Transfer"
            | "PayOutCashback" => VALUE_MOVERS,
            "Adjust" => AGENTS,
            "UpsertProgram" | "SetWalletRules" => ADMINS,
            _ => return None,
        },
        ("tessera.scheduler.v1.SchedulerService", m) => match m {
            "CreateCampaign" | "UpdateCampaign" | "ChangeCampaignState" => AUTHORS,
            "DistributeCampaign" => MARKETERS,
            _ => return None,
        },
        ("tessera.notification.v1.NotificationService", m) => match m {
            "CreateWebhookEndpoint"
            | "UpdateWebhookEndpoint"
            | "RotateWebhookSecret"
            | "ReplayDeliveries"
            | "PutBrand" => ADMINS,
            "PutTemplate" | "DeleteTemplate" => MARKETERS,
            "SendMessage" | "SetSubscription" => &["admin", "marketer", "support_agent"],
            _ => return None,
        },
        _ => return None,
    })
}

/// Paths open without credentials: health (probes) and reflection (schemas only).
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

fn bearer(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .unwrap_or(value);
    Some(key.trim().to_string())
}

/// Authenticates one call's metadata in place: an API key's identity replaces whatever
/// context the caller wrote; a signed context is checked; anything else is refused.
pub async fn authenticate(
    path: &str,
    metadata: &mut MetadataMap,
    keys: Option<&dyn KeyVerifier>,
) -> Result<(), Error> {
    if let Some(key) = bearer(metadata) {
        let Some(keys) = keys else {
            return Err(Error::new(
                Code::Unauthenticated,
                "this server takes no API keys",
            ));
        };
        let identity = keys
            .verify(&key)
            .await?
            .ok_or_else(|| Error::new(Code::Unauthenticated, "invalid or revoked API key"))?;
        let allowed = roles_for(path).ok_or_else(|| {
            Error::new(
                Code::PermissionDenied,
                format!("{path} is the suite's own; API keys may not call it"),
            )
        })?;
        if !allowed.contains(&identity.role.as_str()) {
            return Err(Error::new(
                Code::PermissionDenied,
                format!("the `{}` role may not call {path}", identity.role),
            ));
        }
        for header in [
            SIGNATURE_HEADER,
            TENANT_HEADER,
            PRINCIPAL_HEADER,
            ROLE_HEADER,
        ] {
            metadata.remove(header);
        }
        for (header, value) in [
            (TENANT_HEADER, identity.tenant_id),
            (PRINCIPAL_HEADER, identity.key_id),
            (ROLE_HEADER, identity.role),
        ] {
            let value = value
                .parse()
                .map_err(|_| Error::internal("a key's identity is not valid metadata"))?;
            metadata.insert(header, value);
        }
        metadata.remove("authorization");
        return Ok(());
    }
    if metadata.contains_key(SIGNATURE_HEADER) {
        return verify_signature(metadata);
    }
    Err(Error::new(
        Code::Unauthenticated,
        "missing credentials: send an API key as `authorization: Bearer <key>`",
    ))
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule for async services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        Box::pin(async move {
            if is_open(request.uri().path()) {
                return inner.call(request).await;
            }
            let (mut parts, body) = request.into_parts();
            let mut metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
            let outcome = authenticate(parts.uri.path(), &mut metadata, keys.as_deref()).await;
            parts.headers = metadata.into_headers();
            match outcome {
                Ok(()) => {
                    // Who is calling, for the request's span and its access-log line.
                    let span = tracing::Span::current();
                    for (field, header) in [
                        ("tenant", crate::context::TENANT_HEADER),
                        ("request_id", crate::context::REQUEST_ID_HEADER),
                    ] {
                        if let Some(value) = parts.headers.get(header).and_then(|v| v.to_str().ok())
                        {
                            span.record(field, value);
                        }
                    }
                    inner.call(http::Request::from_parts(parts, body)).await
                }
                Err(e) => {
                    tracing::debug!(path = %parts.uri.path(), error = %e.message, "call refused");
                    Ok(e.to_status().into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(tenant: &str, role: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert(TENANT_HEADER, tenant.parse().unwrap());
        md.insert(PRINCIPAL_HEADER, "service:test".parse().unwrap());
        md.insert(ROLE_HEADER, role.parse().unwrap());
        md.insert(
            SIGNATURE_HEADER,
            sign(tenant, "service:test", role, "").parse().unwrap(),
        );
        md
    }

    #[test]
    fn a_signature_covers_tenant_and_role() {
        let md = signed("acme", "system");
        assert!(verify_signature(&md).is_ok());
        let mut other_tenant = md.clone();
        other_tenant.insert(TENANT_HEADER, "globex".parse().unwrap());
        assert_eq!(
            verify_signature(&other_tenant).unwrap_err().code,
            Code::Unauthenticated
        );
        let mut other_role = signed("acme", "viewer");
        other_role.insert(ROLE_HEADER, "system".parse().unwrap());
        assert!(verify_signature(&other_role).is_err());
    }

    #[test]
    fn old_and_malformed_signatures_are_refused() {
        let mut md = signed("acme", "admin");
        let old = now_secs() - SIGNATURE_TTL_SECS - 1;
        let tag = mac("acme", "service:test", "admin", "", old)
            .finalize()
            .into_bytes();
        let value = format!(
            "v1.{old}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        );
        md.insert(SIGNATURE_HEADER, value.parse().unwrap());
        assert!(
            verify_signature(&md)
                .unwrap_err()
                .message
                .contains("expired")
        );
        for bad in ["", "v1", "v2.1.abc", "v1.x.abc", "v1.1.!!"] {
            md.insert(SIGNATURE_HEADER, bad.parse().unwrap());
            assert!(verify_signature(&md).is_err(), "{bad}");
        }
    }

    struct OneKey;
    impl KeyVerifier for OneKey {
        fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyIdentity>, Error>> {
            Box::pin(async move {
                Ok((key == "tsk_good").then(|| KeyIdentity {
                    tenant_id: "acme".into(),
                    key_id: "key_1".into(),
                    role: "analyst".into(),
                }))
            })
        }
    }

    #[tokio::test]
    async fn a_key_decides_tenant_and_role_whatever_else_is_claimed() {
        let mut md = signed("globex", "system");
        md.insert("authorization", "Bearer tsk_good".parse().unwrap());
        let read = "/tessera.eligibility.v1.EligibilityService/GetCustomer";
        let redeem = "/tessera.eligibility.v1.EligibilityService/Redeem";
        let sync = "/tessera.eligibility.v1.EligibilityService/SyncCatalogCodes";
        let mut viewer = md.clone();
        authenticate(read, &mut md, Some(&OneKey)).await.unwrap();
        assert_eq!(md.get(TENANT_HEADER).unwrap(), "acme");
        assert_eq!(md.get(ROLE_HEADER).unwrap(), "analyst");
        assert_eq!(md.get(PRINCIPAL_HEADER).unwrap(), "key_1");
        assert!(md.get(SIGNATURE_HEADER).is_none());

        let mut bad = MetadataMap::new();
        bad.insert("authorization", "Bearer tsk_bad".parse().unwrap());
        let err = authenticate(read, &mut bad, Some(&OneKey))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unauthenticated);

        // The key's role decides what it may call, whatever role the metadata claimed.
        let err = authenticate(redeem, &mut viewer.clone(), Some(&OneKey))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::PermissionDenied);
        let err = authenticate(sync, &mut viewer, Some(&OneKey))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::PermissionDenied);

        let mut forged = MetadataMap::new();
        forged.insert(TENANT_HEADER, "acme".parse().unwrap());
        forged.insert(ROLE_HEADER, "system".parse().unwrap());
        let err = authenticate(read, &mut forged, Some(&OneKey))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unauthenticated);
    }
}
