//! One database handle for both backends. Each service keeps its tables apart: on SQLite in
//! its own file (`<data_dir>/<service>.db`), on PostgreSQL in its own schema
//! (`<schema_prefix><service>`), so no service can read another's tables by accident.

use std::time::{Duration, Instant};

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use tessera_runtime::{Code, Config, Error};

/// Which engine is behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend behind a connection or transaction.
    pub fn of<C: ConnectionTrait>(conn: &C) -> Self {
        match conn.get_database_backend() {
            sea_orm::DbBackend::Postgres => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }

    /// The clause that locks the selected rows for the rest of the transaction: `FOR UPDATE`
    /// on PostgreSQL; nothing on SQLite, whose write transactions (`BEGIN IMMEDIATE`) already
    /// exclude every other writer.
    pub fn row_lock(self) -> &'static str {
        match self {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        }
    }
}

/// A service's database: a pooled connection plus what the backend needs to know.
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
    /// Owning service, for metric labels.
    service: String,
    backend: Backend,
    /// PostgreSQL schema holding this service's tables.
    schema: Option<String>,
    /// URL without the schema, for maintenance connections.
    url: String,
}

/// Microseconds since the Unix epoch, UTC: how every timestamp is stored.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The host (and port) of a database URL, without credentials, for messages.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// Maps a database error to the API error: lock conflicts and serialization failures are
/// retryable (`ABORTED`), a lost connection is `UNAVAILABLE`, the rest is internal.
#[track_caller]
pub fn db_error(err: DbErr) -> Error {
    let text = err.to_string();
    if text.contains("could not serialize")
        || text.contains("deadlock detected")
        || text.contains("database is locked")
        || text.contains("SQLITE_BUSY")
    {
        tracing::warn!(error = %text, "database conflict");
        return Error::new(Code::Aborted, "concurrent update, retry");
    }
    if matches!(err, DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) {
        return Error::unavailable(text);
    }
    Error::internal(text)
}

impl Db {
    /// Connects the service `service` according to `config.database`, retrying until
    /// `connect_timeout_secs` has passed (the database may start after us).
    pub async fn connect(config: &Config, service: &str) -> anyhow::Result<Self> {
        let (url, backend) = match &config.database.url {
            Some(url) if url.starts_with("sqlite:") => (url.clone(), Backend::Sqlite),
            Some(url) => (url.clone(), Backend::Postgres),
            None => {
                std::fs::create_dir_all(&config.data_dir)?;
                let path = config.data_dir.join(format!("{service}.db"));
                (
                    format!("sqlite://{}?mode=rwc", path.display()),
                    Backend::Sqlite,
                )
            }
        };
        let schema = (backend == Backend::Postgres).then(|| {
            format!(
                "{}{}",
                config.database.schema_prefix,
                service.replace('-', "_")
            )
        });
        let deadline = Instant::now() + Duration::from_secs(config.database.connect_timeout_secs);
        let mut delay = Duration::from_millis(100);
        loop {
            // One attempt never outlasts what is left of `connect_timeout_secs`.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(30));
            match Self::try_connect(&url, backend, schema.as_deref(), config, left).await {
                Ok(mut conn) => {
                    let schema_name = schema.as_deref().unwrap_or("");
                    // Every statement run inside a traced request becomes a span of it.
                    let (system, namespace) = match backend {
                        Backend::Postgres => ("postgresql", schema_name.to_string()),
                        Backend::Sqlite => ("sqlite", service.to_string()),
                    };
                    conn.set_metric_callback(move |info| {
                        tessera_runtime::telemetry::db_span(
                            system,
                            &namespace,
                            &info.statement.sql,
                            info.elapsed,
                            info.failed,
                        );
                    });
                    tracing::info!(
                        service,
                        ?backend,
                        schema = schema_name,
                        "database connected"
                    );
                    return Ok(Self {
                        conn,
                        service: service.to_string(),
                        backend,
                        schema,
                        url,
                    });
                }
                Err(err) if Instant::now() < deadline => {
                    tracing::warn!(service, error = %err, ?delay, "database not reachable, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    return Err(anyhow::anyhow!(
                        "database.url: {} not reachable within database.connect_timeout_secs \
                         ({} s): {err}",
                        host_of(&url),
                        config.database.connect_timeout_secs
                    ));
                }
            }
        }
    }

    async fn try_connect(
        url: &str,
        backend: Backend,
        schema: Option<&str>,
        config: &Config,
        attempt: Duration,
    ) -> Result<DatabaseConnection, DbErr> {
        if let Some(schema) = schema {
            // The schema must exist before connections select it. This first connection
            // also finds out whether the server answers, within the attempt's time.
            let mut admin = Self::options(url, 1);
            admin
                .acquire_timeout(attempt)
                .connect_timeout(attempt.min(Duration::from_secs(5)));
            let admin = Database::connect(admin).await?;
            let created = admin
                .execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await;
            // Two processes creating the same schema at once: the loser sees a unique
            // violation, and the schema exists, which is all we need.
            if let Err(e) = created
                && !e.to_string().contains("duplicate key")
            {
                return Err(e);
            }
            admin.close().await?;
        }
        // SQLite has one writer at a time; with several connections the losers of the write
        // lock sleep in SQLite's busy handler (tail latencies of hundreds of ms). One
        // connection turns that into a fair async queue, and its statements take microseconds.
        let max_connections = match backend {
            Backend::Postgres => config.database.max_connections,
            Backend::Sqlite => 1,
        };
        let mut options = Self::options(url, max_connections);
        match backend {
            Backend::Postgres => {
                if let Some(schema) = schema {
                    options.set_schema_search_path(schema.to_string());
                }
            }
            Backend::Sqlite => {
                options.map_sqlx_sqlite_opts(|o| {
                    use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(Duration::from_secs(30))
                        .foreign_keys(true)
                });
            }
        }
        Database::connect(options).await
    }

    fn options(url: &str, max_connections: u32) -> ConnectOptions {
        let mut options = ConnectOptions::new(url.to_string());
        options
            .max_connections(max_connections)
            .min_connections(0)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(30))
            .sqlx_logging(false);
        options
    }

    /// The pooled connection.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// PostgreSQL schema of this service (None on SQLite).
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// A transaction that will write. On SQLite it takes the write lock at BEGIN
    /// (`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock.
    pub async fn begin_write(&self) -> Result<DatabaseTransaction, Error> {
        let options = TransactionOptions {
            sqlite_transaction_mode: (self.backend == Backend::Sqlite)
                .then_some(SqliteTransactionMode::Immediate),
            ..Default::default()
        };
        self.conn
            .begin_with_options(options)
            .await
            .map_err(db_error)
    }

    /// Cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), Error> {
        self.conn.ping().await.map_err(db_error)
    }

    /// A single-connection handle to the same database and schema, for work that must stay
    /// on one session (migrations: the advisory lock, and SQLite's per-connection schema).
    pub(crate) async fn single_session(&self) -> Result<DatabaseConnection, DbErr> {
        let mut options = Self::options(&self.url, 1);
        if let Some(schema) = &self.schema {
            options.set_schema_search_path(schema.clone());
        }
        if self.backend == Backend::Sqlite {
            options.map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::from_secs(30)));
        }
        Database::connect(options).await
    }

    /// Positional placeholder `n` (1-based) in this backend's SQL dialect. Both backends
    /// accept `$n`; kept as a function so call sites stay dialect-neutral.
    pub fn placeholders(from: usize, count: usize) -> String {
        (from..from + count)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Drops this service's PostgreSQL schema and everything in it (tests).
    pub async fn drop_schema(&self) -> Result<(), DbErr> {
        if let Some(schema) = &self.schema {
            self.conn
                .execute_unprepared(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await?;
        }
        Ok(())
    }
}

/// Most bind parameters one bulk statement carries: under SQLite's limit (32,766) and
/// PostgreSQL's (65,535).
const MAX_PARAMS: usize = 30_000;

/// `(\$1, \$2), (\$3, \$4)`: `rows` tuples of `arity` placeholders numbered from `from`.
pub fn tuples(from: usize, arity: usize, rows: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", Db::placeholders(from + r * arity, arity)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A multi-row statement `{head} VALUES (…), (…) {tail}` over `rows` (all of one arity),
/// sent in as few chunks as the parameter limits allow. Returns the rows affected.
pub async fn insert_rows<C: ConnectionTrait>(
    conn: &C,
    head: &str,
    tail: &str,
    rows: Vec<Vec<sea_orm::Value>>,
) -> Result<u64, Error> {
    let Some(arity) = rows.first().map(Vec::len) else {
        return Ok(0);
    };
    let per_chunk = (MAX_PARAMS / arity.max(1)).max(1);
    let mut affected = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<sea_orm::Value>> = rows.by_ref().take(per_chunk).collect();
        let sql = format!("{head} VALUES {} {tail}", tuples(1, arity, chunk.len()));
        affected += conn
            .execute_raw(stmt(conn, &sql, chunk.into_iter().flatten()))
            .await
            .map_err(db_error)?
            .rows_affected();
    }
    Ok(affected)
}

/// A raw statement for whatever backend `conn` is. SQL uses `$1, $2, …` placeholders.
///
/// On SQLite they are rewritten: there `$1` is a *named* parameter, and both parsing and
/// binding look every name up in a list, which makes a multi-row statement with thousands of
/// parameters quadratic (seconds per statement). Placeholders that appear once each, in
/// order, become anonymous `?` (constant time); any other use becomes `?N`.
pub fn stmt<C: ConnectionTrait>(
    conn: &C,
    sql: &str,
    values: impl IntoIterator<Item = sea_orm::Value>,
) -> sea_orm::Statement {
    let backend = conn.get_database_backend();
    if backend == sea_orm::DbBackend::Sqlite && sql.contains('$') {
        let sql = sqlite_placeholders(sql);
        return sea_orm::Statement::from_sql_and_values(backend, sql, values);
    }
    sea_orm::Statement::from_sql_and_values(backend, sql, values)
}

/// `$N` → `?` when the placeholders are `$1, $2, …` once each in order, else `?N`.
fn sqlite_placeholders(sql: &str) -> String {
    let mut pieces: Vec<(&str, Option<usize>)> = Vec::new();
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        let number = rest[at + 1..at + 1 + digits].parse().ok();
        let end = if number.is_some() {
            at + 1 + digits
        } else {
            at + 1
        };
        pieces.push((&rest[..at], number));
        if number.is_none() {
            pieces.push(("$", None));
        }
        rest = &rest[end..];
    }
    let numbers: Vec<usize> = pieces.iter().filter_map(|p| p.1).collect();
    let in_order = numbers.iter().enumerate().all(|(i, n)| *n == i + 1);
    let mut out = String::with_capacity(sql.len());
    for (text, number) in pieces {
        out.push_str(text);
        match number {
            Some(_) if in_order => out.push('?'),
            Some(n) => {
                out.push('?');
                out.push_str(&n.to_string());
            }
            None => {}
        }
    }
    out.push_str(rest);
    out
}

impl Db {
    /// Connects the service and applies its migrations `M`: what every service does at start.
    /// The pool is opened after the migrations: an SQLite connection that cached the schema
    /// before a migration resolves `ON CONFLICT` targets against the stale copy.
    pub async fn open<M: sea_orm_migration::MigratorTrait>(
        config: &Config,
        service: &str,
    ) -> anyhow::Result<Self> {
        let migrating = Self::connect(config, service).await?;
        crate::migrate::run::<M>(&migrating).await?;
        migrating.conn.close().await?;
        Self::connect(config, service).await
    }

    /// A readiness probe that pings this database and records the pool gauges
    /// `tessera_db_pool_connections{service, state="idle"|"in_use"}`.
    pub fn probe(&self) -> tessera_runtime::component::Probe {
        let db = self.clone();
        std::sync::Arc::new(move || {
            let db = db.clone();
            Box::pin(async move {
                db.record_pool_gauges();
                db.ping()
                    .await
                    .map_err(|e| format!("database: {}", e.message))
            })
        })
    }

    fn record_pool_gauges(&self) {
        let (size, idle) = match self.backend {
            Backend::Postgres => {
                let pool = self.conn.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            Backend::Sqlite => {
                let pool = self.conn.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX);
        let gauge = |state: &'static str, value: u32| {
            metrics::gauge!(
                "tessera_db_pool_connections",
                "service" => self.service.clone(),
                "state" => state
            )
            .set(f64::from(value));
        };
        gauge("idle", idle);
        gauge("in_use", size.saturating_sub(idle));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_is_named_by_its_host_without_credentials() {
        assert_eq!(
            super::host_of("postgres://user:secret@db.internal:5432/app?sslmode=require"),
            "db.internal:5432"
        );
        assert_eq!(super::host_of("postgres://127.0.0.1/postgres"), "127.0.0.1");
    }

    #[test]
    fn sqlite_placeholders() {
        use super::sqlite_placeholders as p;
        assert_eq!(p("VALUES ($1, $2), ($3, $4)"), "VALUES (?, ?), (?, ?)");
        assert_eq!(
            p("SELECT $1, $12 WHERE a = '$' AND b = $1"),
            "SELECT ?1, ?12 WHERE a = '$' AND b = ?1"
        );
        assert_eq!(p("a = $2 AND b = $1"), "a = ?2 AND b = ?1");
        assert_eq!(p("no placeholders $x"), "no placeholders $x");
    }
}
