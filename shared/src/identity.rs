//! A cluster's identity and its life cycle, decided without I/O: what a join
//! token binds (the name and labels the hub gives, whatever the agent claims),
//! how long a token may live, which client certificate of a cluster the hub
//! still accepts (one pinned certificate per cluster, so a deleted cluster's
//! or a replaced one's is refused), and when an agent renews its certificate.

use std::time::Duration;

use crate::labels::Labels;

/// What a join token fixes about the cluster that enrols with it. An unbound
/// token (both `None`) lets the agent choose its name and seed labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// The only name the token enrols.
    pub cluster_name: Option<String>,
    /// The labels the cluster gets.
    pub labels: Option<Labels>,
}

impl Binding {
    /// Whether the token fixes anything: then the agent's claimed labels are
    /// ignored (replaced by the token's, none if it names none).
    pub fn is_bound(&self) -> bool {
        self.cluster_name.is_some() || self.labels.is_some()
    }
}

/// The identity an enrolment gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub name: String,
    pub labels: Labels,
    /// The agent claimed labels other than the ones it gets.
    pub labels_replaced: bool,
}

/// Why a bound token refuses an enrolment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingRefusal {
    #[error(
        "this join token is bound to cluster name {bound:?}, not {asked:?} \
         (start the agent with --cluster-name {bound})"
    )]
    OtherName { bound: String, asked: String },
}

/// Decides the name and labels of an enrolment from what the token binds and
/// what the agent asks for. A bound name must be the one asked for (an empty
/// request takes it); a bound token's labels replace the claimed ones.
pub fn admit(
    binding: &Binding,
    asked_name: &str,
    asked_labels: &Labels,
) -> Result<Admitted, BindingRefusal> {
    let name = match &binding.cluster_name {
        Some(bound) if asked_name.is_empty() || asked_name == bound => bound.clone(),
        Some(bound) => {
            return Err(BindingRefusal::OtherName {
                bound: bound.clone(),
                asked: asked_name.to_string(),
            })
        }
        None => asked_name.to_string(),
    };
    if !binding.is_bound() {
        return Ok(Admitted {
            name,
            labels: asked_labels.clone(),
            labels_replaced: false,
        });
    }
    let labels = binding.labels.clone().unwrap_or_default();
    Ok(Admitted {
        labels_replaced: &labels != asked_labels,
        name,
        labels,
    })
}

/// Join tokens live at most a week unless the hub says otherwise
/// (`flotilla-hub --max-token-ttl`): a token is a bearer credential for a new
/// identity, and an old unused one is more likely leaked than needed.
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a token's lifetime was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlRefusal {
    #[error("a join token's ttl must be longer than zero")]
    Zero,
    #[error(
        "ttl {asked} is longer than this hub allows for join tokens ({max}; \
         flotilla-hub --max-token-ttl)"
    )]
    TooLong { asked: String, max: String },
}

/// Checks a requested token lifetime against the hub's cap.
pub fn check_token_ttl(ttl: Duration, max: Duration) -> Result<(), TtlRefusal> {
    if ttl.is_zero() {
        return Err(TtlRefusal::Zero);
    }
    if ttl > max {
        return Err(TtlRefusal::TooLong {
            asked: human(ttl),
            max: human(max),
        });
    }
    Ok(())
}

/// `7d`, `36h`, `90s`: the largest unit that divides the duration.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, per) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(per) {
            return format!("{}{unit}", s / per);
        }
    }
    format!("{s}s")
}

/// The client certificates the hub accepts for one cluster, by SHA-256 of
/// their DER: the current one and, after a renewal, the one just issued (until
/// the agent first uses it, when it becomes the current one and the old one is
/// refused). A record from before pinning has neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertPins {
    pub current: Option<String>,
    pub next: Option<String>,
}

/// A certificate's fingerprint as pinned: SHA-256 of its DER, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    crate::token::ca_hash(der)
}

/// How the hub sees a certificate presented for a cluster it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The pinned certificate.
    Current,
    /// The renewed certificate, used for the first time: pin it, drop the old.
    Renewed,
    /// The cluster was enrolled before certificates were pinned: pin this one.
    Unpinned,
    /// Any other certificate of that name: an older one, or one issued before
    /// the cluster was deleted and enrolled again.
    Refused,
}

impl Standing {
    pub fn accepted(self) -> bool {
        self != Standing::Refused
    }
}

/// Judges a presented certificate (its fingerprint) against a cluster's pins.
pub fn standing(pins: &CertPins, presented: &str) -> Standing {
    match (&pins.current, &pins.next) {
        (Some(c), _) if c == presented => Standing::Current,
        (_, Some(n)) if n == presented => Standing::Renewed,
        (None, None) => Standing::Unpinned,
        _ => Standing::Refused,
    }
}

/// The pins once `presented` (accepted with `standing`) was used.
pub fn pin(pins: &CertPins, presented: &str, standing: Standing) -> CertPins {
    match standing {
        Standing::Current | Standing::Refused => pins.clone(),
        Standing::Renewed | Standing::Unpinned => CertPins {
            current: Some(presented.to_string()),
            next: None,
        },
    }
}

/// Agent certificates live 30 days unless the hub says otherwise
/// (`flotilla-hub --agent-cert-ttl`): agents renew them on their own, so a
/// short life costs nothing, and a key copied off a cluster dies soon.
pub const DEFAULT_AGENT_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// When an agent renews a certificate valid from `not_before` to `not_after`
/// (ms since the epoch): once two thirds of its life have passed, leaving a
/// third for a hub that is away.
pub fn renew_at(not_before_ms: i64, not_after_ms: i64) -> i64 {
    let life = not_after_ms.saturating_sub(not_before_ms).max(0);
    not_before_ms.saturating_add(life / 3 * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_unbound_token_takes_what_the_agent_asks() {
        let asked = labels(&[("env", "prod")]);
        let a = admit(&Binding::default(), "edge-1", &asked).unwrap();
        assert_eq!(
            a,
            Admitted {
                name: "edge-1".into(),
                labels: asked,
                labels_replaced: false
            }
        );
    }

    #[test]
    fn a_bound_name_refuses_another_and_names_the_bound_one() {
        let b = Binding {
            cluster_name: Some("edge-1".into()),
            labels: None,
        };
        let err = admit(&b, "prod-eu-1", &Labels::new()).unwrap_err();
        assert_eq!(
            err,
            BindingRefusal::OtherName {
                bound: "edge-1".into(),
                asked: "prod-eu-1".into()
            }
        );
        assert!(err.to_string().contains("--cluster-name edge-1"), "{err}");
        assert_eq!(admit(&b, "edge-1", &Labels::new()).unwrap().name, "edge-1");
        assert_eq!(admit(&b, "", &Labels::new()).unwrap().name, "edge-1");
    }

    #[test]
    fn a_bound_token_replaces_claimed_labels() {
        // The attacker holds a token meant for a dev cluster and claims prod.
        let b = Binding {
            cluster_name: Some("edge-1".into()),
            labels: Some(labels(&[("env", "dev")])),
        };
        let a = admit(&b, "edge-1", &labels(&[("env", "prod"), ("tier", "db")])).unwrap();
        assert_eq!(a.labels, labels(&[("env", "dev")]));
        assert!(a.labels_replaced);
        let same = admit(&b, "edge-1", &labels(&[("env", "dev")])).unwrap();
        assert!(!same.labels_replaced);
        // A token binding only the name still takes the label choice away.
        let name_only = Binding {
            cluster_name: Some("edge-1".into()),
            labels: None,
        };
        let a = admit(&name_only, "edge-1", &labels(&[("env", "prod")])).unwrap();
        assert!(a.labels.is_empty() && a.labels_replaced);
        // Labels only: any name, the token's labels.
        let labels_only = Binding {
            cluster_name: None,
            labels: Some(labels(&[("env", "dev")])),
        };
        let a = admit(&labels_only, "other", &labels(&[("env", "prod")])).unwrap();
        assert_eq!(
            (a.name.as_str(), a.labels),
            ("other", labels(&[("env", "dev")]))
        );
    }

    #[test]
    fn token_ttl_is_capped() {
        let max = DEFAULT_MAX_TOKEN_TTL;
        assert_eq!(check_token_ttl(Duration::from_secs(3600), max), Ok(()));
        assert_eq!(check_token_ttl(max, max), Ok(()));
        let err = check_token_ttl(max + Duration::from_secs(1), max).unwrap_err();
        assert!(err.to_string().contains("(7d;"), "{err}");
        assert!(err.to_string().contains("604801s"), "{err}");
        assert_eq!(check_token_ttl(Duration::ZERO, max), Err(TtlRefusal::Zero));
        assert_eq!(human(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn only_the_pinned_certificate_stands() {
        let pins = CertPins {
            current: Some("a".into()),
            next: None,
        };
        assert_eq!(standing(&pins, "a"), Standing::Current);
        assert_eq!(standing(&pins, "b"), Standing::Refused);
        assert!(!Standing::Refused.accepted());
        // After a renewal both stand until the new one is used; then only it.
        let renewing = CertPins {
            current: Some("a".into()),
            next: Some("b".into()),
        };
        assert_eq!(standing(&renewing, "a"), Standing::Current);
        assert_eq!(standing(&renewing, "b"), Standing::Renewed);
        assert_eq!(pin(&renewing, "a", Standing::Current), renewing);
        let renewed = pin(&renewing, "b", Standing::Renewed);
        assert_eq!(standing(&renewed, "a"), Standing::Refused);
        assert_eq!(standing(&renewed, "b"), Standing::Current);
        // A record from before pinning pins the first certificate it sees.
        let legacy = CertPins::default();
        assert_eq!(standing(&legacy, "x"), Standing::Unpinned);
        let pinned = pin(&legacy, "x", Standing::Unpinned);
        assert_eq!(standing(&pinned, "y"), Standing::Refused);
    }

    #[test]
    fn renewal_comes_at_two_thirds_of_the_life() {
        assert_eq!(renew_at(0, 30_000), 20_000);
        assert_eq!(renew_at(1_000, 1_000), 1_000);
        assert_eq!(
            renew_at(5_000, 1_000),
            5_000,
            "a backwards range renews at once"
        );
    }
}
