//! The rollout planner's cost: `rollout::step` per call, over a whole simulated
//! rollout of N clusters in 10 partitions (10% of a partition at a time, clusters
//! Ready one step after they get the revision), plus `rollout::partition` once.
//! Pure CPU, no I/O: the observations are built outside the timed calls.

use std::time::Instant;

use flotilla_shared::labels::Labels;
use flotilla_shared::rollout::{self, Observed, Rollout};
use flotilla_shared::state::BundleState;
use flotilla_shared::targeting::ClusterInfo;
use serde_json::json;

use crate::report::PlannerRun;

/// Partitions of the benchmark's rollout.
pub const PARTITIONS: usize = 10;

/// One whole rollout of `clusters` clusters, timing every `step` call; then
/// `repeat` calls on the state half-way through (the usual step: little changes).
pub fn run(clusters: usize, repeat: usize) -> PlannerRun {
    let partitions: Vec<serde_json::Value> = (0..PARTITIONS)
        .map(|i| json!({"name": format!("p{i}"), "clusterSelector": {"matchLabels": {"part": i.to_string()}}}))
        .collect();
    let strategy = rollout::parse_strategy(&json!({
        "maxUnavailable": "10%",
        "partitions": partitions,
    }))
    .expect("the benchmark's strategy is valid");
    let infos: Vec<ClusterInfo> = (0..clusters)
        .map(|i| ClusterInfo {
            name: format!("cluster-{i:06}"),
            labels: Labels::from([("part".to_string(), (i % PARTITIONS).to_string())]),
        })
        .collect();
    let t = Instant::now();
    let plan = rollout::partition(&strategy, &infos, &[]);
    let partition_ms = t.elapsed().as_secs_f64() * 1e3;

    let observe = |r: &Rollout, now: u64| -> Vec<Observed> {
        infos
            .iter()
            .map(|c| {
                let ready = r.clusters.get(&c.name).is_some_and(|p| p.admitted_ms < now);
                Observed {
                    cluster: c.name.clone(),
                    connected: true,
                    on_revision: ready,
                    state: ready.then_some(BundleState::Ready),
                }
            })
            .collect()
    };
    let mut r = Rollout::start("bench", "c2", Some("c1".into()), 0);
    let mut times_us = Vec::new();
    let mut middle: Option<(Vec<Observed>, Rollout, u64)> = None;
    for s in 0..100_000u64 {
        let now = s * 1000;
        let obs = observe(&r, now);
        let t = Instant::now();
        let next = rollout::step(&strategy, &plan, &obs, &r, now);
        times_us.push(t.elapsed().as_secs_f64() * 1e6);
        if middle.is_none() && r.partitions_done.len() >= PARTITIONS / 2 {
            middle = Some((obs, r.clone(), now));
        }
        r = next.rollout;
        if r.phase.is_final() {
            break;
        }
    }
    let steps = times_us.len();
    if let Some((obs, mid, now)) = &middle {
        for _ in 0..repeat {
            let t = Instant::now();
            let out = rollout::step(&strategy, &plan, obs, mid, *now);
            times_us.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(out);
        }
    }
    times_us.sort_by(f64::total_cmp);
    let at = |q: f64| times_us[((times_us.len() - 1) as f64 * q).round() as usize];
    PlannerRun {
        clusters,
        partitions: plan.partitions.len(),
        steps,
        calls: times_us.len(),
        completed: r.phase == rollout::Phase::Completed,
        step_median_us: at(0.5),
        step_p99_us: at(0.99),
        step_max_us: at(1.0),
        partition_ms,
    }
}
