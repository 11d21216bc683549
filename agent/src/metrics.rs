//! The agent's Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`):
//! bundle applies, their duration and their errors, and the Kubernetes Events
//! recorded or not (`crate::events`). Series carry no bundle or
//! commit label: an agent's metrics stay a handful whatever it runs.

use std::convert::Infallible;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

pub struct Metrics {
    registry: Registry,
    pub applies: Counter,
    pub apply_errors: Counter,
    pub apply_duration: Histogram,
    pub events: Counter,
    pub event_errors: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flotilla_agent");
        let applies = Counter::default();
        let apply_errors = Counter::default();
        // 10 ms … about 5.5 min, doubling.
        let apply_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register("applies", "Bundle applies attempted", applies.clone());
        registry.register(
            "apply_errors",
            "Bundle applies that failed (the bundle is ErrApplied)",
            apply_errors.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "How long applying one bundle took, pruning included",
            apply_duration.clone(),
        );
        let events = Counter::default();
        let event_errors = Counter::default();
        registry.register(
            "events",
            "Kubernetes Events recorded in the cluster (created, or a repeat counted on one)",
            events.clone(),
        );
        registry.register(
            "event_errors",
            "Kubernetes Events not recorded: refused, timed out, or dropped from a full queue",
            event_errors.clone(),
        );
        Metrics {
            registry,
            applies,
            apply_errors,
            apply_duration,
            events,
            event_errors,
        }
    }

    /// One apply and how it went.
    pub fn applied(&self, seconds: f64, ok: bool) {
        self.applies.inc();
        if !ok {
            self.apply_errors.inc();
        }
        self.apply_duration.observe(seconds);
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) until shut down.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut shutdown) => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let found =
                            req.method() == hyper::Method::GET && req.uri().path() == "/metrics";
                        let resp = if found {
                            hyper::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.text())))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_default())
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_and_errors_are_counted() {
        let m = Metrics::new();
        m.applied(0.5, true);
        m.applied(0.2, false);
        let t = m.text();
        assert!(t.contains("flotilla_agent_applies_total 2"), "{t}");
        assert!(t.contains("flotilla_agent_apply_errors_total 1"), "{t}");
        assert!(
            t.contains("flotilla_agent_apply_duration_seconds_count 2"),
            "{t}"
        );
        m.event_errors.inc();
        let t = m.text();
        assert!(t.contains("flotilla_agent_events_total 0"), "{t}");
        assert!(t.contains("flotilla_agent_event_errors_total 1"), "{t}");
    }
}
