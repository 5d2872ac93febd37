//! A service as the runtime sees it: the gRPC services it registers, the names it reports on
//! the health service, background tasks (outbox relay, jobs) and readiness probes (database,
//! cache). The same [`Component`] runs alone on its own listener (production: one Deployment
//! per service) or merged with the others on one server (`tessera up`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

/// A readiness probe: `Err` carries what is not ready.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

type Register = Box<dyn FnOnce(&mut RoutesBuilder) + Send>;

/// One service, ready to serve.
pub struct Component {
    /// Short name (`wallet`), used in logs.
    pub name: &'static str,
    /// Fully qualified gRPC service names reported on the health service.
    pub health_names: Vec<String>,
    register: Vec<Register>,
    tasks: Vec<JoinHandle<()>>,
    probes: Vec<Probe>,
    /// Health entries of their own: a failing one reports a degraded dependency without
    /// taking the component out of service.
    degraded: Vec<(String, Probe)>,
    /// Its work queues' dead letters, served by `tessera.ops.v1.QueueService`.
    dead_letters: Option<Arc<dyn crate::ops::DeadLetters>>,
    /// Its personal data, served by `tessera.ops.v1.PrivacyService`.
    customer_data: Option<Arc<dyn crate::ops::CustomerData>>,
}

impl Component {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            health_names: Vec::new(),
            register: Vec::new(),
            tasks: Vec::new(),
            probes: Vec::new(),
            degraded: Vec::new(),
            dead_letters: None,
            customer_data: None,
        }
    }

    /// Adds a gRPC service; `health_name` is its fully qualified name.
    pub fn grpc(
        mut self,
        health_name: &str,
        register: impl FnOnce(&mut RoutesBuilder) + Send + 'static,
    ) -> Self {
        self.health_names.push(health_name.to_string());
        self.register.push(Box::new(register));
        self
    }

    /// Adds a background task, already spawned; it must stop when the shutdown token fires.
    pub fn task(mut self, handle: JoinHandle<()>) -> Self {
        self.tasks.push(handle);
        self
    }

    /// Adds a readiness probe.
    pub fn probe(mut self, probe: Probe) -> Self {
        self.probes.push(probe);
        self
    }

    /// Hands over the component's dead letters (listed and replayed through
    /// `tessera.ops.v1.QueueService`, under the component's name).
    pub fn dead_letters(mut self, queues: Arc<dyn crate::ops::DeadLetters>) -> Self {
        self.dead_letters = Some(queues);
        self
    }

    /// Serves the personal data the component keeps (`tessera.ops.v1.PrivacyService`,
    /// under the component's name).
    pub fn customer_data(mut self, data: Arc<dyn crate::ops::CustomerData>) -> Self {
        self.customer_data = Some(data);
        self
    }

    /// Adds a health entry `health_name` reporting a dependency the component can work
    /// without (slower): NOT_SERVING there means degraded, the component stays in service.
    pub fn degraded_when(mut self, health_name: &str, probe: Probe) -> Self {
        self.degraded.push((health_name.to_string(), probe));
        self
    }
}

/// Serves `components` on one listener until `shutdown`, then waits for their tasks.
/// Every call is authenticated first ([`crate::auth`]); `keys` resolves the API keys of
/// external callers (None: only the suite's own signed calls are taken). Probes run every `probe_interval`; a failing probe flips the component's health entries
/// to NOT_SERVING until it passes again.
pub async fn serve(
    listener: TcpListener,
    components: Vec<Component>,
    keys: Option<std::sync::Arc<dyn crate::auth::KeyVerifier>>,
    drain: Duration,
    probe_interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut routes = RoutesBuilder::default();
    let mut tasks = Vec::new();
    let mut checks = Vec::new();
    let mut names = Vec::new();
    let mut optional = Vec::new();
    let mut dead_letters = std::collections::BTreeMap::new();
    let mut customer_data = std::collections::BTreeMap::new();
    for component in components {
        if let Some(queues) = component.dead_letters {
            dead_letters.insert(component.name, queues);
        }
        if let Some(data) = component.customer_data {
            customer_data.insert(component.name, data);
        }
        for register in component.register {
            register(&mut routes);
        }
        tasks.extend(component.tasks);
        if !component.probes.is_empty() {
            checks.push((
                component.name,
                component.health_names.clone(),
                component.probes,
            ));
        }
        names.extend(component.health_names);
        for (name, probe) in component.degraded {
            names.push(name.clone());
            optional.push((name, probe));
        }
    }
    if !dead_letters.is_empty() {
        routes.add_service(crate::ops::server(dead_letters));
    }
    if !customer_data.is_empty() {
        routes.add_service(crate::ops::privacy_server(customer_data));
    }
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let prober = {
        let reporter = reporter.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // What each entry last reported, so a problem is logged when it starts and
            // ends, not on every probe.
            let mut last: std::collections::HashMap<String, bool> = Default::default();
            let mut changed = |name: &str, ok: bool| last.insert(name.to_string(), ok) != Some(ok);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(probe_interval) => {},
                }
                for (name, probe) in &optional {
                    let result = answered(probe).await;
                    if changed(name, result.is_ok()) {
                        match &result {
                            Ok(()) => tracing::info!(%name, "recovered"),
                            Err(problem) => tracing::warn!(%name, %problem, "degraded"),
                        }
                    }
                    let status = if result.is_ok() {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status(name.as_str(), status).await;
                }
                for (component, names, probes) in &checks {
                    let mut problem = None;
                    for probe in probes {
                        if let Err(e) = answered(probe).await {
                            problem = Some(e);
                            break;
                        }
                    }
                    if shutdown.is_cancelled() {
                        break;
                    }
                    if changed(component, problem.is_none()) {
                        match &problem {
                            Some(problem) => tracing::warn!(component, %problem, "not ready"),
                            None => tracing::info!(component, "ready"),
                        }
                    }
                    let status = if problem.is_some() {
                        tonic_health::ServingStatus::NotServing
                    } else {
                        tonic_health::ServingStatus::Serving
                    };
                    for name in names {
                        reporter.set_service_status(name.as_str(), status).await;
                    }
                }
            }
        })
    };
    let result = crate::grpc::serve(
        listener,
        routes.routes(),
        (reporter, health_service),
        names,
        crate::auth::AuthLayer::new(keys),
        drain,
        shutdown,
    )
    .await;
    prober.abort();
    for task in tasks {
        if let Err(err) = task.await {
            tracing::error!(%err, "background task failed");
        }
    }
    result
}

/// Serves one component alone (its own Deployment), with the drain time from `config`.
pub async fn serve_one(
    config: &crate::Config,
    listener: TcpListener,
    component: Component,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A service running alone asks the gateway who an API key is.
    let keys = crate::auth::RemoteKeys::new(&config.peers.gateway_url, config.peer_timeout());
    serve(
        listener,
        vec![component],
        Some(std::sync::Arc::new(keys)),
        Duration::from_secs(config.shutdown_drain_secs),
        PROBE_INTERVAL,
        shutdown,
    )
    .await
}

/// How often readiness probes run.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a probe may take: a dependency that does not answer (a cut connection) is down
/// after this, not after the driver's own timeouts.
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

/// What `probe` answered within [`PROBE_TIMEOUT`].
async fn answered(probe: &Probe) -> Result<(), String> {
    tokio::time::timeout(PROBE_TIMEOUT, probe())
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())))
}
