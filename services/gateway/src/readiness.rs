//! `/readyz`: whether the gateway can serve, and if not, what it waits for. Every
//! dependency is asked at once and each for at most [`WAIT`], so the answer comes within a
//! second even when the database or a peer does not answer at all (a cut connection),
//! and names what is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use utoipa::ToSchema;

use crate::AppState;

/// How long one dependency may take to answer.
const WAIT: Duration = Duration::from_millis(800);

/// The segment cache's health entry on eligibility (a degraded cache slows qualification
/// but does not stop it, so it is reported and does not make the gateway unready).
const CACHE: &str = "tessera.eligibility.v1.EligibilityService/segment-cache";

/// Readiness and what it was made of.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ready` or `not_ready`.
    status: String,
    /// Each dependency (`database`, each service by name, `segment_cache`): `ok`, or what
    /// is wrong with it.
    checks: BTreeMap<String, String>,
}

/// What one dependency answered within [`WAIT`].
async fn within<F>(check: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    tokio::time::timeout(WAIT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", WAIT.as_millis())))
}

/// Whether `channel`'s server reports `service` as serving.
async fn serving(channel: tessera_runtime::grpc::Channel, service: &str) -> Result<(), String> {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|status| format!("unreachable: {}", status.message()))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("{} ({service})", other.as_str_name())),
    }
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let checks = [("shutdown".to_string(), "draining".to_string())].into();
        return answer(false, checks);
    }
    let database = within(async { state.db.ping().await.map_err(|e| e.message) });
    let peers = futures::future::join_all(state.peers.iter().map(|peer| async move {
        (
            peer.name,
            within(serving(peer.channel.clone(), peer.health)).await,
        )
    }));
    let cache = state
        .peers
        .iter()
        .find(|p| p.name == "eligibility")
        .map(|p| within(serving(p.channel.clone(), CACHE)));
    let (database, peers, cache) = tokio::join!(database, peers, async {
        match cache {
            Some(check) => Some(check.await),
            None => None,
        }
    });
    let ready = database.is_ok() && peers.iter().all(|(_, r)| r.is_ok());
    let said = |r: Result<(), String>| r.map_or_else(|e| e, |()| "ok".to_string());
    let mut checks = BTreeMap::from([("database".to_string(), said(database))]);
    checks.extend(
        peers
            .into_iter()
            .map(|(name, r)| (name.to_string(), said(r))),
    );
    if let Some(cache) = cache {
        checks.insert("segment_cache".into(), said(cache));
    }
    answer(ready, checks)
}

fn answer(ready: bool, checks: BTreeMap<String, String>) -> Response {
    let (code, status) = if ready {
        (http::StatusCode::OK, "ready")
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let body = Readiness {
        status: status.into(),
        checks,
    };
    (code, Json(body)).into_response()
}
