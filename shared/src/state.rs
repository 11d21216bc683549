//! Per bundle and cluster states, with Rancher Fleet's meanings, and how the hub
//! combines what it sent with what the agent reported.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BundleState {
    /// Applied, and every object is healthy.
    Ready,
    /// Applied, not yet healthy.
    NotReady,
    /// Sent to the agent, not yet applied.
    WaitApplied,
    /// Render or apply failed; the message names file, object and reason.
    ErrApplied,
    /// Held back, e.g. by a rollout or a pause.
    OutOfSync,
    /// Not yet sent.
    Pending,
    /// The live state differs from the desired one.
    Modified,
}

impl BundleState {
    pub const ALL: [BundleState; 7] = [
        BundleState::Ready,
        BundleState::NotReady,
        BundleState::WaitApplied,
        BundleState::ErrApplied,
        BundleState::OutOfSync,
        BundleState::Pending,
        BundleState::Modified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BundleState::Ready => "Ready",
            BundleState::NotReady => "NotReady",
            BundleState::WaitApplied => "WaitApplied",
            BundleState::ErrApplied => "ErrApplied",
            BundleState::OutOfSync => "OutOfSync",
            BundleState::Pending => "Pending",
            BundleState::Modified => "Modified",
        }
    }
}

impl fmt::Display for BundleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BundleState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        BundleState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown bundle state {s:?}"))
    }
}

/// What an agent last reported for one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub content_hash: String,
    pub revision: String,
    pub state: BundleState,
    pub message: String,
}

/// The state the hub shows for a bundle on a cluster.
///
/// - a render error at the hub wins: the agent keeps the last good content, but the
///   bundle is `ErrApplied` with the render message;
/// - a report about the content currently assigned is shown as reported;
/// - otherwise the new content is on its way: `WaitApplied` once the agent has
///   acknowledged it, `Pending` before.
pub fn effective_state(
    assigned_hash: &str,
    render_error: Option<&str>,
    acknowledged: bool,
    reported: Option<&Reported>,
) -> (BundleState, String) {
    if let Some(err) = render_error {
        return (BundleState::ErrApplied, err.to_string());
    }
    match reported {
        Some(r) if r.content_hash == assigned_hash => (r.state, r.message.clone()),
        _ if acknowledged => (BundleState::WaitApplied, String::new()),
        _ => (BundleState::Pending, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in BundleState::ALL {
            assert_eq!(s.to_string().parse::<BundleState>().unwrap(), s);
        }
    }

    #[test]
    fn effective() {
        let r = Reported {
            content_hash: "h1".into(),
            revision: "c1".into(),
            state: BundleState::Ready,
            message: String::new(),
        };
        assert_eq!(
            effective_state("h1", None, true, Some(&r)).0,
            BundleState::Ready
        );
        assert_eq!(
            effective_state("h2", None, true, Some(&r)).0,
            BundleState::WaitApplied
        );
        assert_eq!(
            effective_state("h2", None, false, Some(&r)).0,
            BundleState::Pending
        );
        let (st, msg) = effective_state("h1", Some("a.yaml:3: bad"), true, Some(&r));
        assert_eq!(st, BundleState::ErrApplied);
        assert!(msg.contains("a.yaml:3"));
    }
}
