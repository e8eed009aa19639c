//! Connections to a service's database: a pool for the services, a plain
//! client for setup and the read-only reports.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, NoTls};

use crate::shop::error::Error;

/// A connection that does not come within this is an error (and retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(url: &str) -> Result<Client, Error> {
    let (client, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| Error::Other(format!("no connection within {CONNECT_TIMEOUT:?}")))??;
    tokio::spawn(async move {
        // Its error reaches the client as a failed query too.
        let _ = connection.await;
    });
    Ok(client)
}

/// A pool of `size` connections, named `application_name` in
/// pg_stat_activity. A connection the server closed fails its next query;
/// the handler retries, and the pool replaces it.
pub fn pool(url: &str, size: usize, application_name: &str) -> Result<Pool, Error> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Other(format!("bad database URL: {e}")))?;
    config.application_name(application_name);
    // A connection that dies silently (a cut network) fails its query
    // within about 25 s instead of hanging a consumer; a statement stuck
    // on a lock gives up after 30 s. Either way the handler retries.
    config
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .options("-c statement_timeout=30s");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // Verified: a connection the server dropped while idle (a
            // restart, pg_terminate_backend) is replaced before it is used.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Other(format!("cannot build the pool: {e}")))
}
