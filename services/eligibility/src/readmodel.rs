//! Per-tenant read models a replica keeps in memory (compiled campaigns, compiled segments),
//! each stamped with the database version it was built from. A caller checks the version
//! at most every [`FRESHNESS`]; a replica that changed the data itself forgets its copy at
//! once, so changes (a kill switch) reach every replica within that time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How stale a replica's read model may be.
pub const FRESHNESS: Duration = Duration::from_millis(500);

pub struct ReadModel<T> {
    tenants: RwLock<HashMap<String, (Instant, Arc<T>)>>,
}

impl<T> Default for ReadModel<T> {
    fn default() -> Self {
        Self {
            tenants: RwLock::default(),
        }
    }
}

impl<T> ReadModel<T> {
    fn entry(&self, tenant: &str) -> Option<(Instant, Arc<T>)> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    /// The tenant's model if its version was checked within [`FRESHNESS`].
    pub fn fresh(&self, tenant: &str) -> Option<Arc<T>> {
        self.entry(tenant)
            .filter(|(checked, _)| checked.elapsed() < FRESHNESS)
            .map(|(_, model)| model)
    }

    /// The tenant's model, however old (to compare its version or reuse its parts).
    pub fn stale(&self, tenant: &str) -> Option<Arc<T>> {
        self.entry(tenant).map(|(_, model)| model)
    }

    /// Stores a model just built or whose version was just confirmed.
    pub fn store(&self, tenant: &str, model: Arc<T>) {
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_string(), (Instant::now(), model));
    }

    /// Forgets the tenant's model (this replica changed it).
    pub fn forget(&self, tenant: &str) {
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tenant);
    }
}
