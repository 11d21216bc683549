use super::*;

fn spec(events: &[Event]) -> NotificationSpec {
    NotificationSpec {
        sink: SinkType::Webhook,
        url: Some("http://127.0.0.1:1/hook".into()),
        secret_ref: None,
        events: events.to_vec(),
        bundle_selector: None,
        cluster_selector: None,
        not_ready_grace: Some("10s".into()),
        offline_grace: Some("60s".into()),
    }
}

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cluster(name: &str, env: &str) -> ClusterSeen {
    ClusterSeen {
        name: name.into(),
        labels: labels(&[("env", env)]),
        offline_since_ms: None,
    }
}

fn on(cluster: &str, state: BundleState, hash: &str) -> OnCluster {
    OnCluster {
        cluster: cluster.into(),
        state,
        content_hash: Some(hash.into()),
        target_hash: Some(hash.into()),
        message: String::new(),
    }
}

/// Three prod clusters, one dev; bundle `web` (team=pay) at `hash` on all four.
fn world(now_ms: u64, hash: &str, states: [BundleState; 4]) -> World {
    let names = ["a", "b", "c", "d"];
    World {
        now_ms,
        now: format!("t{now_ms}"),
        clusters: vec![
            cluster("a", "prod"),
            cluster("b", "prod"),
            cluster("c", "prod"),
            cluster("d", "dev"),
        ],
        bundles: vec![BundleSeen {
            name: "web".into(),
            source: "repo".into(),
            labels: labels(&[("team", "pay")]),
            revision: format!("rev-{hash}"),
            content_hash: Some(hash.into()),
            clusters: names
                .iter()
                .zip(states)
                .map(|(n, s)| on(n, s, hash))
                .collect(),
        }],
        sources: vec![SourceSeen {
            name: "repo".into(),
            error: None,
        }],
        rollouts: vec![],
        drift: vec![],
        drift_last_id: 0,
    }
}

use BundleState::{ErrApplied, NotReady, Ready, WaitApplied};

fn run(s: &NotificationSpec, m: &Memory, w: &World) -> (Memory, Vec<Message>) {
    decide("hooks", s, Some(m), w)
}

#[test]
fn first_look_is_the_baseline() {
    let s = spec(&Event::ALL);
    let w = world(1000, "h1", [Ready, Ready, ErrApplied, Ready]);
    let (m, msgs) = decide("hooks", &s, None, &w);
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(m.digests["web"].content_hash, "h1");
    // Nothing changed: nothing to say.
    let (m2, msgs) = run(
        &s,
        &m,
        &world(2000, "h1", [Ready, Ready, ErrApplied, Ready]),
    );
    assert!(msgs.is_empty());
    assert_eq!(m2.digests, m.digests);
}

#[test]
fn one_digest_per_revision_once_every_cluster_has_an_outcome() {
    let s = spec(&[Event::RevisionReady, Event::ErrApplied]);
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    // A new revision: two clusters applied, two not yet.
    let (m, msgs) = run(
        &s,
        &m,
        &world(10, "h1", [Ready, Ready, WaitApplied, WaitApplied]),
    );
    assert!(msgs.is_empty(), "not settled: {msgs:?}");
    let (m, msgs) = run(&s, &m, &world(20, "h1", [Ready, Ready, Ready, Ready]));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let d = &msgs[0];
    assert_eq!(d.events, vec![Event::RevisionReady]);
    assert_eq!(d.body["kind"], "BundleDigest");
    assert_eq!(d.body["revision"], "rev-h1");
    assert_eq!(d.body["clusters"].as_array().unwrap().len(), 4);
    assert_eq!(d.body["counts"]["Ready"], 4);
    assert_eq!(d.body["id"], d.key);
    // Transitions only: the same world again says nothing.
    let (m, msgs) = run(&s, &m, &world(30, "h1", [Ready; 4]));
    assert!(msgs.is_empty());
    // A cluster fails later in the same revision: a follow-up of the change.
    let (_, msgs) = run(&s, &m, &world(40, "h1", [Ready, ErrApplied, Ready, Ready]));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].events, vec![Event::ErrApplied]);
    assert_eq!(msgs[0].body["update"], true);
    assert_eq!(msgs[0].body["clusters"][0]["cluster"], "b");
    assert_eq!(msgs[0].body["clusters"].as_array().unwrap().len(), 1);
    assert_ne!(msgs[0].key, d.key);
}

#[test]
fn an_unwanted_digest_is_remembered_not_sent() {
    let s = spec(&[Event::ErrApplied]);
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    let (m, msgs) = run(&s, &m, &world(10, "h1", [Ready; 4]));
    assert!(msgs.is_empty(), "RevisionReady is not asked for");
    assert_eq!(m.digests["web"].content_hash, "h1");
    let (_, msgs) = run(&s, &m, &world(20, "h1", [Ready, Ready, Ready, ErrApplied]));
    assert_eq!(msgs.len(), 1);
}

#[test]
fn not_ready_counts_after_the_grace_period() {
    let s = spec(&[Event::NotReady, Event::RevisionReady]);
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    let (m, msgs) = run(&s, &m, &world(1_000, "h1", [Ready, Ready, Ready, NotReady]));
    assert!(msgs.is_empty());
    assert_eq!(m.not_ready_since["web/d"], 1_000);
    let (m, msgs) = run(
        &s,
        &m,
        &world(10_999, "h1", [Ready, Ready, Ready, NotReady]),
    );
    assert!(msgs.is_empty(), "within grace");
    let (m, msgs) = run(
        &s,
        &m,
        &world(11_000, "h1", [Ready, Ready, Ready, NotReady]),
    );
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].events, vec![Event::NotReady]);
    assert_eq!(msgs[0].body["counts"]["NotReady"], 1);
    // It becomes Ready: everything is Ready now.
    let (m, msgs) = run(&s, &m, &world(12_000, "h1", [Ready; 4]));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].events, vec![Event::RevisionReady]);
    assert!(m.not_ready_since.is_empty());
}

#[test]
fn selectors_choose_clusters_and_bundles() {
    let mut s = spec(&[Event::RevisionReady, Event::ErrApplied]);
    s.cluster_selector = Some(LabelSelector::parse("env=prod").unwrap());
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    // d (dev) never settles; prod does.
    let (m, msgs) = run(&s, &m, &world(10, "h1", [Ready, Ready, Ready, WaitApplied]));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body["clusters"].as_array().unwrap().len(), 3);
    // d failing is not this notification's business.
    let (_, msgs) = run(&s, &m, &world(20, "h1", [Ready, Ready, Ready, ErrApplied]));
    assert!(msgs.is_empty());

    let mut s = spec(&[Event::RevisionReady]);
    s.bundle_selector = Some(LabelSelector::parse("team=other").unwrap());
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    let (_, msgs) = run(&s, &m, &world(10, "h1", [Ready; 4]));
    assert!(msgs.is_empty());
}

#[test]
fn offline_past_grace_once_and_again_after_a_return() {
    let s = spec(&[Event::ClusterOffline]);
    let mut w = world(0, "h0", [Ready; 4]);
    let (m, _) = decide("hooks", &s, None, &w);
    w.clusters[1].offline_since_ms = Some(1_000);
    w.now_ms = 60_999;
    let (m, msgs) = run(&s, &m, &w);
    assert!(msgs.is_empty(), "within grace");
    w.now_ms = 61_000;
    let (m, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body["clusters"][0]["cluster"], "b");
    w.now_ms = 100_000;
    let (m, msgs) = run(&s, &m, &w);
    assert!(msgs.is_empty(), "said once");
    w.clusters[1].offline_since_ms = None;
    let (m, _) = run(&s, &m, &w);
    assert!(m.offline.is_empty());
    w.clusters[1].offline_since_ms = Some(100_000);
    w.now_ms = 200_000;
    let (_, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
}

#[test]
fn an_offline_cluster_settles_a_digest() {
    let s = spec(&[Event::RevisionReady, Event::ErrApplied]);
    let mut w = world(0, "h0", [Ready; 4]);
    let (m, _) = decide("hooks", &s, None, &w);
    w = world(100_000, "h1", [Ready, Ready, Ready, WaitApplied]);
    w.clusters[3].offline_since_ms = Some(0);
    let (_, msgs) = run(&s, &m, &w);
    // Offline is an outcome; with it, not everything is Ready and nothing failed.
    assert!(msgs.is_empty(), "{msgs:?}");
    let s = spec(&[
        Event::RevisionReady,
        Event::ErrApplied,
        Event::ClusterOffline,
    ]);
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    let (m2, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1, "the offline message only: {msgs:?}");
    assert_eq!(msgs[0].events, vec![Event::ClusterOffline]);
    assert_eq!(m2.digests["web"].outcomes["d"], Outcome::Offline);
}

#[test]
fn source_errors_on_transition() {
    let s = spec(&[Event::SourceError]);
    let mut w = world(0, "h0", [Ready; 4]);
    let (m, _) = decide("hooks", &s, None, &w);
    w.sources[0].error = Some("fetch failed".into());
    let (m, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body["error"], "fetch failed");
    w.sources[0].error = Some("another failure".into());
    let (m, msgs) = run(&s, &m, &w);
    assert!(msgs.is_empty(), "still failing: no news");
    w.sources[0].error = None;
    let (m, _) = run(&s, &m, &w);
    w.sources[0].error = Some("again".into());
    let (_, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
}

#[test]
fn rollout_ends_once_per_revision() {
    let s = spec(&[Event::RolloutHalted, Event::RolledBack]);
    let mut w = world(0, "h0", [Ready; 4]);
    let (m, _) = decide("hooks", &s, None, &w);
    w.rollouts = vec![RolloutSeen {
        bundle: "web".into(),
        revision: "r2".into(),
        end: Some(RolloutEnd::Halted),
        reason: "2 of 2 failed".into(),
    }];
    let (m, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].events, vec![Event::RolloutHalted]);
    let (m, msgs) = run(&s, &m, &w);
    assert!(msgs.is_empty());
    w.rollouts[0].end = Some(RolloutEnd::RolledBack);
    let (_, msgs) = run(&s, &m, &w);
    assert_eq!(msgs[0].events, vec![Event::RolledBack]);
}

#[test]
fn drift_grouped_by_bundle_after_the_cursor() {
    let s = spec(&[Event::Drift]);
    let mut w = world(0, "h0", [Ready; 4]);
    w.drift_last_id = 5;
    let (m, _) = decide("hooks", &s, None, &w);
    assert_eq!(m.drift_after, 5);
    let d = |id, cluster: &str| DriftSeen {
        id,
        cluster: cluster.into(),
        bundle: "web".into(),
        object: "ConfigMap app/x".into(),
        fields: vec!["data.k".into()],
        manager: "kubectl-edit".into(),
        corrected: true,
    };
    w.drift = vec![d(5, "a"), d(6, "a"), d(7, "b")];
    w.drift_last_id = 7;
    let (m, msgs) = run(&s, &m, &w);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body["drift"].as_array().unwrap().len(), 2);
    assert_eq!(m.drift_after, 7);
    let (_, msgs) = run(&s, &m, &w);
    assert!(msgs.is_empty());
}

#[test]
fn keys_differ_across_incarnations_and_messages() {
    assert_ne!(message_key("n", 1, 1), message_key("n", 1, 2));
    assert_ne!(message_key("n", 1, 1), message_key("n", 2, 1));
    assert_ne!(message_key("n", 1, 1), message_key("m", 1, 1));
    assert_eq!(message_key("n", 1, 1).len(), 32);
}

#[test]
fn hostile_text_is_escaped_for_slack_and_clipped() {
    let s = spec(&[Event::ErrApplied]);
    let (m, _) = decide("hooks", &s, None, &world(0, "h0", [Ready; 4]));
    let mut w = world(10, "h1", [Ready, Ready, Ready, ErrApplied]);
    w.bundles[0].clusters[3].message = format!(
        "<!channel> <http://evil.example|click> & {}",
        "x".repeat(2000)
    );
    let (_, msgs) = run(&s, &m, &w);
    let body = slack_body("hooks", &msgs[0]);
    let text = body["text"].as_str().unwrap();
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(!text.contains("<http"), "{text}");
    assert!(text.contains("&lt;!channel&gt;"));
    assert!(text.contains("&amp;"));
    assert!(text.len() < 1000, "clipped: {}", text.len());
}

#[test]
fn spec_validation_names_the_problem() {
    let ok = spec(&[Event::Drift]);
    ok.validate("n").unwrap();
    let mut s = ok.clone();
    s.events.clear();
    assert!(s
        .validate("n")
        .unwrap_err()
        .to_string()
        .contains("spec.events"));
    let mut s = ok.clone();
    s.url = Some("file:///etc/passwd".into());
    assert!(s.validate("n").unwrap_err().to_string().contains("http"));
    let mut s = ok.clone();
    s.url = Some("https://user:pw@hooks.example/x".into());
    let e = s.validate("n").unwrap_err().to_string();
    assert!(e.contains("credentials") && !e.contains("pw@"), "{e}");
    let mut s = ok.clone();
    s.url = None;
    assert!(s
        .validate("n")
        .unwrap_err()
        .to_string()
        .contains("spec.url"));
    let mut s = ok.clone();
    s.sink = SinkType::Slack;
    s.url = None;
    s.secret_ref = Some("slack-url".into());
    s.validate("n").unwrap();
    let mut s = ok.clone();
    s.offline_grace = Some("soon".into());
    assert!(s.validate("n").is_err());
    assert_eq!(
        shown_url("https://hooks.example/a?token=x#f"),
        "https://hooks.example/a"
    );
}

#[test]
fn parsed_from_yaml_with_unknown_fields_refused() {
    let yaml = "apiVersion: flotilla.io/v1alpha1\nkind: Notification\nmetadata: {name: alerts}\nspec:\n  type: webhook\n  url: http://127.0.0.1:9/h\n  events: [RevisionReady, Drift]\n  clusterSelector: {matchLabels: {env: prod}}\n";
    let objs = crate::objects::parse_objects("n.yaml", yaml).unwrap();
    assert_eq!(objs[0].kind(), "Notification");
    let bad = yaml.replace("events:", "evnts:");
    let e = crate::objects::parse_objects("n.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n.yaml") && e.contains("Notification alerts"),
        "{e}"
    );
    let bad = yaml.replace("Drift", "Everything");
    assert!(crate::objects::parse_objects("n.yaml", &bad).is_err());
}
