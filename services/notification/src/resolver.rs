//! The webhook client's DNS resolver: it connects only to addresses it checked itself.
//!
//! `endpoints::check_url` refuses an endpoint whose host resolves to a loopback, private,
//! link-local or metadata address, but the HTTP client used to resolve the host again to
//! connect: a name that answers a public address to the check and `127.0.0.1` to the
//! connection (DNS rebinding) reached the inside. With [`Guarded`] as the client's resolver,
//! the addresses the connection uses are the ones checked, in the same lookup: a forbidden
//! one fails the connection. Hosts in `webhooks.allowed_hosts` are not checked.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::endpoints::forbidden;

/// Resolves a host name to its addresses.
pub type Lookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> + Send + Sync>;

/// The system resolver (the one tokio uses).
pub fn system() -> Lookup {
    Arc::new(|host: String| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    })
}

/// A resolver that refuses forbidden addresses (see the module docs).
pub struct Guarded {
    lookup: Lookup,
    allowed_hosts: Vec<String>,
}

impl Guarded {
    pub fn new(lookup: Lookup, allowed_hosts: Vec<String>) -> Self {
        Self {
            lookup,
            allowed_hosts,
        }
    }
}

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allowed = self
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host));
        let lookup = self.lookup.clone();
        Box::pin(async move {
            let addresses = lookup(host.clone()).await?;
            if !allowed && addresses.iter().any(|ip| forbidden(*ip)) {
                return Err(format!(
                    "{host} resolves to a loopback, private, link-local or metadata address"
                )
                .into());
            }
            let addrs: Addrs = Box::new(
                addresses
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, 0))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers a public address the first time, loopback after: a rebinding name.
    fn rebinding() -> Lookup {
        let calls = Arc::new(AtomicUsize::new(0));
        Arc::new(move |_host: String| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(vec![if n == 0 {
                    IpAddr::from([93, 184, 216, 34])
                } else {
                    IpAddr::from([127, 0, 0, 1])
                }])
            })
        })
    }

    #[tokio::test]
    async fn a_rebinding_name_cannot_reach_loopback() {
        // A sink on loopback that must never be reached.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let reached = Arc::new(AtomicUsize::new(0));
        let counter = reached.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        let lookup = rebinding();
        // The check's lookup sees the public address...
        assert_eq!(
            lookup("rebind.example".into()).await.unwrap(),
            vec![IpAddr::from([93, 184, 216, 34])]
        );
        // ...the connection's lookup answers loopback, and is refused.
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(Guarded::new(lookup.clone(), Vec::new())))
            .build()
            .unwrap();
        let sent = client
            .post(format!("http://rebind.example:{port}/hook"))
            .body("{}")
            .send()
            .await;
        assert!(sent.is_err(), "{sent:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(reached.load(Ordering::SeqCst), 0, "loopback was reached");

        // Unchecked (as for an allowed host: tests, on-premise receivers), the same answer
        // does reach loopback: the refusal above is the guard's.
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(Guarded::new(lookup, vec!["sink.internal".into()])))
            .build()
            .unwrap();
        let _ = client
            .post(format!("http://sink.internal:{port}/hook"))
            .timeout(std::time::Duration::from_millis(300))
            .send()
            .await;
        assert_eq!(
            reached.load(Ordering::SeqCst),
            1,
            "the allowed host was reached"
        );
    }
}
