//! Simulated agents: each enrols with its own join token through the real
//! Enrolment service and keeps its own mutual-TLS connection with one
//! `Fleet.Session` stream, speaking the real protocol (Hello, DesiredAck, a
//! `Ready` status per received bundle, heartbeats). The TLS configurations, the
//! dialling and the key/CSR come from the agent crate; what a simulated agent
//! skips is the cluster (it applies nothing) and the sled store.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use flotilla_agent::{enroll, transport};
use flotilla_proto::v1::agent_message::Msg as AgentMsg;
use flotilla_proto::v1::enrolment_client::EnrolmentClient;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_proto::v1::hub_message::Msg as HubMsg;
use flotilla_proto::v1::{
    AgentMessage, BundleState, BundleStatus, DesiredAck, EnrollRequest, GetCaRequest, Heartbeat,
    Hello,
};
use flotilla_shared::token::{ca_hash, JoinToken};
use rustls::ClientConfig;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Uri;

/// What simulated agents tell the driver.
#[derive(Debug)]
pub enum Event {
    /// Agent `agent` acknowledged a Desired set whose bundles are at `revision`
    /// (the first bundle's; empty for an empty set).
    Acked {
        agent: usize,
        revision: String,
        at: Instant,
        /// Protobuf size of the Desired message (before any compression).
        desired_bytes: usize,
    },
    /// The agent's session ended with an error.
    Failed { agent: usize, error: String },
}

/// Fetches the hub's CA and checks it against the join token's pin, as the agent does.
pub async fn fetch_ca(hub: &Uri, token: &str) -> Result<String> {
    let token: JoinToken = token.parse().map_err(|e| anyhow!("join token: {e}"))?;
    let channel = transport::channel(hub, transport::insecure_config()?).await?;
    let ca_pem = EnrolmentClient::new(channel)
        .get_ca(GetCaRequest {})
        .await?
        .into_inner()
        .ca_pem;
    let der = transport::certs_from_pem(&ca_pem)?;
    if ca_hash(der[0].as_ref()) != token.ca_hash {
        bail!("the hub's CA does not match the token's pin");
    }
    Ok(ca_pem)
}

/// Enrols cluster `name` with `token` on its own connection; returns the mutual-TLS
/// configuration for its session.
pub async fn enrol(
    hub: &Uri,
    anonymous: Arc<ClientConfig>,
    ca_pem: &str,
    token: &str,
    name: &str,
) -> Result<Arc<ClientConfig>> {
    let token: JoinToken = token.parse().map_err(|e| anyhow!("join token: {e}"))?;
    let (key_pem, csr_pem) = enroll::key_and_csr(name)?;
    let channel = transport::channel(hub, anonymous).await?;
    let resp = EnrolmentClient::new(channel)
        .enroll(EnrollRequest {
            token: token.credential(),
            cluster_name: name.to_string(),
            labels: [("bench".to_string(), "true".to_string())].into(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow!("enrolling {name}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(transport::mutual_config(
        ca_pem,
        &resp.certificate_pem,
        &key_pem,
    )?)
}

/// Runs agent `agent`'s session until `stop` turns true or the stream fails.
/// With `gzip`, it accepts gzip-compressed messages (the real agent does not, yet).
pub async fn session(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    gzip: bool,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let r = run(agent, &hub, tls, gzip, &events, &mut stop).await;
    if let Err(e) = r {
        let _ = events.send(Event::Failed {
            agent,
            error: format!("{e:#}"),
        });
    }
}

async fn run(
    agent: usize,
    hub: &Uri,
    tls: Arc<ClientConfig>,
    gzip: bool,
    events: &mpsc::UnboundedSender<Event>,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let channel = transport::channel(hub, tls).await?;
    let mut client = FleetClient::new(channel);
    if gzip {
        client = client.accept_compressed(CompressionEncoding::Gzip);
    }
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let send = |m: AgentMsg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| anyhow!("stream closed"))
        }
    };
    send(AgentMsg::Hello(Hello {
        agent_version: format!("bench-{}", env!("CARGO_PKG_VERSION")),
        kubernetes_version: "v1.34.0-sim".into(),
        held_hashes: vec![],
        api_versions: vec![],
    }))
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + flotilla_agent::session::HEARTBEAT,
        flotilla_agent::session::HEARTBEAT,
    );
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    if let Some(HubMsg::Desired(d)) = m.msg {
                        send(AgentMsg::Ack(DesiredAck { generation: d.generation })).await?;
                        let revision = d.bundles.first().map(|b| b.revision.clone()).unwrap_or_default();
                        let desired_bytes = prost::Message::encoded_len(&d);
                        let _ = events.send(Event::Acked { agent, revision, at: Instant::now(), desired_bytes });
                        for b in d.bundles.iter().filter(|b| d.contents.iter().any(|c| c.content_hash == b.content_hash)) {
                            seq += 1;
                            send(AgentMsg::Status(BundleStatus {
                                bundle: b.name.clone(),
                                content_hash: b.content_hash.clone(),
                                revision: b.revision.clone(),
                                state: BundleState::Ready as i32,
                                message: String::new(),
                                seq,
                                observed_at_unix_ms: now_ms(),
                            })).await?;
                        }
                    }
                }
                Ok(None) => bail!("the hub closed the stream"),
                Err(s) => bail!("stream: {:?}: {}", s.code(), s.message()),
            },
            _ = heartbeat.tick() => send(AgentMsg::Heartbeat(Heartbeat {})).await?,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
