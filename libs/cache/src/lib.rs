//! The segment cache: which segments a customer belongs to, computed by eligibility from
//! rules and cached so qualification stays fast. Redis in production (shared by every
//! eligibility replica), an in-process map in the embedded default; both behind
//! [`SegmentCache`] and tested with the same suite.
//!
//! Entries are keyed by tenant and customer. Each tenant has a *generation*: bumping it
//! ([`SegmentCache::invalidate_tenant`], e.g. when a segment definition changes) makes every
//! entry of that tenant stale at once without scanning keys. Each entry also carries the
//! version of the customer's facts it was computed from, so a slow writer cannot overwrite a
//! newer membership with an older one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// Segment membership of one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Version of the customer's facts this was computed from (monotonic per customer).
    pub facts_version: u64,
    /// Segment ids the customer belongs to.
    pub segments: BTreeSet<String>,
}

/// A cache failure. Callers treat the cache as an optimisation: on error they recompute.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt cache entry: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Counts a lookup in `tessera_segment_cache_requests_total{backend, result}`.
fn count_lookup(backend: &'static str, found: &Option<Membership>) {
    let result = if found.is_some() { "hit" } else { "miss" };
    metrics::counter!("tessera_segment_cache_requests_total", "backend" => backend, "result" => result)
        .increment(1);
}

#[derive(Serialize, Deserialize)]
struct Entry {
    generation: u64,
    membership: Membership,
}

/// The segment cache interface.
#[async_trait::async_trait]
pub trait SegmentCache: Send + Sync + 'static {
    /// The cached membership, if present and of the tenant's current generation.
    async fn get(&self, tenant: &str, customer: &str) -> Result<Option<Membership>, CacheError>;
    /// Stores a membership unless a newer one (higher `facts_version`) of the current
    /// generation is already cached. Returns whether it was stored.
    async fn put(
        &self,
        tenant: &str,
        customer: &str,
        membership: &Membership,
    ) -> Result<bool, CacheError>;
    /// Forgets one customer (their facts changed).
    async fn invalidate(&self, tenant: &str, customer: &str) -> Result<(), CacheError>;
    /// Makes every entry of the tenant stale (a segment definition changed).
    async fn invalidate_tenant(&self, tenant: &str) -> Result<(), CacheError>;
    /// Round trip to the backend, for readiness checks.
    async fn ping(&self) -> Result<(), CacheError>;
    /// "redis" or "memory".
    fn kind(&self) -> &'static str;
}

/// In-process cache for the embedded default (one process, no Redis).
pub struct MemoryCache {
    ttl: Duration,
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    generations: HashMap<String, u64>,
    entries: HashMap<(String, String), (Instant, u64, Membership)>,
}

impl MemoryCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl SegmentCache for MemoryCache {
    async fn get(&self, tenant: &str, customer: &str) -> Result<Option<Membership>, CacheError> {
        let inner = self.lock();
        let generation = inner.generations.get(tenant).copied().unwrap_or(0);
        let found = inner
            .entries
            .get(&(tenant.to_string(), customer.to_string()))
            .filter(|(expires, entry_gen, _)| *expires > Instant::now() && *entry_gen == generation)
            .map(|(_, _, m)| m.clone());
        count_lookup("memory", &found);
        Ok(found)
    }

    async fn put(
        &self,
        tenant: &str,
        customer: &str,
        membership: &Membership,
    ) -> Result<bool, CacheError> {
        let mut inner = self.lock();
        let generation = inner.generations.get(tenant).copied().unwrap_or(0);
        let key = (tenant.to_string(), customer.to_string());
        if let Some((expires, entry_gen, existing)) = inner.entries.get(&key)
            && *expires > Instant::now()
            && *entry_gen == generation
            && existing.facts_version > membership.facts_version
        {
            return Ok(false);
        }
        inner.entries.insert(
            key,
            (Instant::now() + self.ttl, generation, membership.clone()),
        );
        Ok(true)
    }

    async fn invalidate(&self, tenant: &str, customer: &str) -> Result<(), CacheError> {
        self.lock()
            .entries
            .remove(&(tenant.to_string(), customer.to_string()));
        Ok(())
    }

    async fn invalidate_tenant(&self, tenant: &str) -> Result<(), CacheError> {
        let mut inner = self.lock();
        *inner.generations.entry(tenant.to_string()).or_insert(0) += 1;
        inner.entries.retain(|(t, _), _| t != tenant);
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Redis-backed cache, shared by every replica. Uses a multiplexed, auto-reconnecting
/// connection; the conditional write is one Lua script so it is atomic.
#[derive(Clone)]
pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl: Duration,
}

/// KEYS[1] = entry key, KEYS[2] = generation key; ARGV[1] = facts_version, ARGV[2] = JSON
/// membership, ARGV[3] = ttl seconds. Writes unless a newer entry of the current generation
/// exists. Returns 1 when written.
const PUT_SCRIPT: &str = r#"
local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
local current = redis.call('GET', KEYS[1])
if current then
  local ok, entry = pcall(cjson.decode, current)
  if ok and tonumber(entry['generation']) == gen
     and tonumber(entry['membership']['facts_version']) > tonumber(ARGV[1]) then
    return 0
  end
end
local value = '{"generation":' .. gen .. ',"membership":' .. ARGV[2] .. '}'
redis.call('SET', KEYS[1], value, 'EX', ARGV[3])
return 1
"#;

impl RedisCache {
    /// Connects to `url`; every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<Self, CacheError> {
        let client = redis::Client::open(url)?;
        // The cache is an optimisation: when Redis is slow or away, a request gives up on it
        // quickly and computes membership itself instead of waiting on reconnects.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            ttl,
        })
    }

    fn entry_key(&self, tenant: &str, customer: &str) -> String {
        format!("{}:seg:{{{tenant}}}:m:{customer}", self.prefix)
    }

    fn generation_key(&self, tenant: &str) -> String {
        format!("{}:seg:{{{tenant}}}:gen", self.prefix)
    }
}

#[async_trait::async_trait]
impl SegmentCache for RedisCache {
    async fn get(&self, tenant: &str, customer: &str) -> Result<Option<Membership>, CacheError> {
        let mut conn = self.conn.clone();
        let (entry, generation): (Option<String>, Option<u64>) = redis::pipe()
            .get(self.entry_key(tenant, customer))
            .get(self.generation_key(tenant))
            .query_async(&mut conn)
            .await?;
        let found = match entry {
            None => None,
            Some(entry) => {
                let entry: Entry = serde_json::from_str(&entry)?;
                (entry.generation == generation.unwrap_or(0)).then_some(entry.membership)
            }
        };
        count_lookup("redis", &found);
        Ok(found)
    }

    async fn put(
        &self,
        tenant: &str,
        customer: &str,
        membership: &Membership,
    ) -> Result<bool, CacheError> {
        let mut conn = self.conn.clone();
        let written: i64 = redis::Script::new(PUT_SCRIPT)
            .key(self.entry_key(tenant, customer))
            .key(self.generation_key(tenant))
            .arg(membership.facts_version)
            .arg(serde_json::to_string(membership)?)
            .arg(self.ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(written == 1)
    }

    async fn invalidate(&self, tenant: &str, customer: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.entry_key(tenant, customer)).await?;
        Ok(())
    }

    async fn invalidate_tenant(&self, tenant: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.incr(self.generation_key(tenant), 1).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// Opens the configured cache: Redis when `redis_url` is set (retrying for up to `wait` while
/// Redis starts), else the in-process cache.
pub async fn open(
    redis_url: Option<&str>,
    key_prefix: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<std::sync::Arc<dyn SegmentCache>, CacheError> {
    let Some(url) = redis_url else {
        return Ok(std::sync::Arc::new(MemoryCache::new(ttl)));
    };
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    loop {
        match RedisCache::connect(url, key_prefix, ttl).await {
            Ok(cache) => return Ok(std::sync::Arc::new(cache)),
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(error = %err, ?delay, "redis not reachable, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    //! One suite for both implementations. The Redis run needs `TESSERA_TEST_REDIS_URL`;
    //! without it the Redis test is skipped, unless `TESSERA_REQUIRE_BACKENDS=1`, which
    //! turns the missing backend into a failure.
    use super::*;

    fn membership(version: u64, segments: &[&str]) -> Membership {
        Membership {
            facts_version: version,
            segments: segments.iter().map(|s| s.to_string()).collect(),
        }
    }

    async fn contract(cache: &dyn SegmentCache) {
        let t = format!("t{}", uuid::Uuid::new_v4().simple());
        assert_eq!(cache.get(&t, "c1").await.unwrap(), None);
        assert!(
            cache
                .put(&t, "c1", &membership(2, &["vip", "uk"]))
                .await
                .unwrap()
        );
        assert_eq!(
            cache.get(&t, "c1").await.unwrap(),
            Some(membership(2, &["vip", "uk"]))
        );
        // An older computation never overwrites a newer one.
        assert!(!cache.put(&t, "c1", &membership(1, &["old"])).await.unwrap());
        assert_eq!(cache.get(&t, "c1").await.unwrap().unwrap().facts_version, 2);
        // Tenants are isolated.
        assert_eq!(cache.get("other-tenant", "c1").await.unwrap(), None);
        cache.invalidate(&t, "c1").await.unwrap();
        assert_eq!(cache.get(&t, "c1").await.unwrap(), None);
        // A tenant-wide invalidation makes every entry stale, and older versions may be
        // written again afterwards (the generation changed).
        cache.put(&t, "c1", &membership(5, &["a"])).await.unwrap();
        cache.put(&t, "c2", &membership(1, &["b"])).await.unwrap();
        cache.invalidate_tenant(&t).await.unwrap();
        assert_eq!(cache.get(&t, "c1").await.unwrap(), None);
        assert_eq!(cache.get(&t, "c2").await.unwrap(), None);
        assert!(cache.put(&t, "c1", &membership(3, &["c"])).await.unwrap());
        assert_eq!(
            cache.get(&t, "c1").await.unwrap(),
            Some(membership(3, &["c"]))
        );
        cache.ping().await.unwrap();
    }

    #[tokio::test]
    async fn memory_cache_honours_the_contract() {
        contract(&MemoryCache::new(Duration::from_secs(60))).await;
    }

    #[tokio::test]
    async fn redis_cache_honours_the_contract() {
        let Ok(url) = std::env::var("TESSERA_TEST_REDIS_URL") else {
            assert!(
                std::env::var("TESSERA_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "TESSERA_REQUIRE_BACKENDS=1 but TESSERA_TEST_REDIS_URL is not set"
            );
            eprintln!("skipped: TESSERA_TEST_REDIS_URL not set");
            return;
        };
        let prefix = format!("tessera-test-{}", uuid::Uuid::new_v4().simple());
        let cache = RedisCache::connect(&url, &prefix, Duration::from_secs(60))
            .await
            .expect("redis reachable");
        assert_eq!(cache.kind(), "redis");
        contract(&cache).await;
    }

    #[tokio::test]
    async fn memory_entries_expire() {
        let cache = MemoryCache::new(Duration::from_millis(20));
        cache.put("t", "c", &membership(1, &["x"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(cache.get("t", "c").await.unwrap(), None);
    }
}
