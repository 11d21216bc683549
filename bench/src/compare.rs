//! Two builds side by side: the results of the same benchmark parts, run in the
//! same session on the same machine (alternating, see `scripts/bench-compare.sh`),
//! for a base revision and a new one. Each figure is the median of the runs with
//! its range; a change is called noise when the two ranges overlap.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{AgentRun, FleetRun, GitRun, HubRun, ReconnectRun, WireRun};
use crate::stats::{summary, Summary};

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub what: String,
    pub base: Summary,
    pub new: Summary,
    pub digits: usize,
}

impl Row {
    /// `within noise` when the ranges overlap, else the direction and size of
    /// the change of the medians.
    pub fn verdict(&self) -> String {
        if self.base.runs == 0 || self.new.runs == 0 {
            return "–".into();
        }
        let overlap = self.new.min <= self.base.max && self.base.min <= self.new.max;
        if overlap {
            return "within noise".into();
        }
        let change = if self.base.median == 0.0 {
            0.0
        } else {
            (self.new.median - self.base.median) / self.base.median * 100.0
        };
        let word = if change > 0.0 { "higher" } else { "lower" };
        format!("{:+.0}% ({word})", change)
    }
}

fn row<T>(what: String, base: &[&T], new: &[&T], digits: usize, f: impl Fn(&T) -> f64) -> Row {
    let s = |rs: &[&T]| summary(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
    Row {
        what,
        base: s(base),
        new: s(new),
        digits,
    }
}

fn group<T, K: Ord>(runs: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, Vec<&T>> {
    let mut m: BTreeMap<K, Vec<&T>> = BTreeMap::new();
    for r in runs {
        m.entry(key(r)).or_default().push(r);
    }
    m
}

/// The results of one part in `dir` and in each of its subdirectories (one per
/// round: a part's file holds the runs of one invocation).
fn load<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let mut files = vec![path.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut subs: Vec<_> = entries
            .flatten()
            .map(|e| e.path().join(name))
            .filter(|p| p.exists())
            .collect();
        subs.sort();
        files.extend(subs);
    }
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f.exists()) {
        out.extend(crate::report::load::<T>(f)?);
    }
    Ok(out)
}

fn has(dir: &Path, name: &str) -> bool {
    !load::<serde_json::Value>(&dir.join(name))
        .unwrap_or_default()
        .is_empty()
}

/// Rows for every part both directories hold results of (in the directory or
/// its round subdirectories), per count.
pub fn rows(base: &Path, new: &Path) -> Vec<Row> {
    let mut out = Vec::new();
    let both = |name: &str| -> bool { has(base, name) && has(new, name) };
    if both("hub.json") {
        let (b, n) = (
            load::<HubRun>(&base.join("hub.json")).unwrap_or_default(),
            load::<HubRun>(&new.join("hub.json")).unwrap_or_default(),
        );
        let (gb, gn) = (group(&b, |r| r.agents), group(&n, |r| r.agents));
        for (count, rb) in &gb {
            let Some(rn) = gn.get(count) else { continue };
            let nf = *count as f64;
            out.push(row(
                format!("hub RSS, MiB ({count} agents)"),
                rb,
                rn,
                1,
                |r| r.rss_kib as f64 / 1024.0,
            ));
            out.push(row(
                format!("hub per agent, KiB ({count} agents)"),
                rb,
                rn,
                1,
                |r| (r.rss_kib as f64 - r.baseline_rss_kib as f64) / nf,
            ));
            out.push(row(
                format!("hub CPU at steady state, % of a core ({count} agents)"),
                rb,
                rn,
                1,
                |r| r.cpu_pct,
            ));
            out.push(row(
                format!("enrol + connect from cold, s ({count} agents)"),
                rb,
                rn,
                2,
                |r| r.connect_s,
            ));
            out.push(row(
                format!("commit to fleet (poll), last agent, ms ({count} agents)"),
                rb,
                rn,
                0,
                |r| r.commit.max_ms,
            ));
        }
    }
    if both("fleet.json") {
        let (b, n) = (
            load::<FleetRun>(&base.join("fleet.json")).unwrap_or_default(),
            load::<FleetRun>(&new.join("fleet.json")).unwrap_or_default(),
        );
        let (gb, gn) = (group(&b, |r| r.agents), group(&n, |r| r.agents));
        for (count, rb) in &gb {
            let Some(rn) = gn.get(count) else { continue };
            out.push(row(
                format!("commit to fleet (webhook), median agent, ms ({count} agents)"),
                rb,
                rn,
                0,
                |r| r.commit.median_ms,
            ));
            out.push(row(
                format!("commit to fleet (webhook), last agent, ms ({count} agents)"),
                rb,
                rn,
                0,
                |r| r.commit.max_ms,
            ));
        }
    }
    if both("reconnect.json") {
        let (b, n) = (
            load::<ReconnectRun>(&base.join("reconnect.json")).unwrap_or_default(),
            load::<ReconnectRun>(&new.join("reconnect.json")).unwrap_or_default(),
        );
        let (gb, gn) = (group(&b, |r| r.agents), group(&n, |r| r.agents));
        for (count, rb) in &gb {
            let Some(rn) = gn.get(count) else { continue };
            out.push(row(
                format!("mass reconnect after kill -9, last agent back, s ({count} agents)"),
                rb,
                rn,
                2,
                |r| r.back.max_ms / 1000.0,
            ));
            out.push(row(
                format!("mass reconnect, listen-queue overflows ({count} agents)"),
                rb,
                rn,
                0,
                |r| r.listen_overflows as f64,
            ));
            out.push(row(
                format!("hub RSS after the reconnect, MiB ({count} agents)"),
                rb,
                rn,
                1,
                |r| r.rss_kib as f64 / 1024.0,
            ));
        }
    }
    if both("wire.json") {
        let (b, n) = (
            load::<WireRun>(&base.join("wire.json")).unwrap_or_default(),
            load::<WireRun>(&new.join("wire.json")).unwrap_or_default(),
        );
        let (gb, gn) = (
            group(&b, |r| (r.objects, r.gzip)),
            group(&n, |r| (r.objects, r.gzip)),
        );
        for ((objects, gzip), rb) in &gb {
            let Some(rn) = gn.get(&(*objects, *gzip)) else {
                continue;
            };
            let how = if *gzip { "gzip" } else { "no gzip" };
            out.push(row(
                format!("bytes on the wire, one-line change of {objects} objects ({how})"),
                rb,
                rn,
                0,
                |r| r.change_wire_bytes as f64,
            ));
            out.push(row(
                format!("bytes on the wire, first Desired of {objects} objects ({how})"),
                rb,
                rn,
                0,
                |r| r.initial_wire_bytes as f64,
            ));
        }
    }
    if both("agent.json") {
        let (b, n) = (
            load::<AgentRun>(&base.join("agent.json")).unwrap_or_default(),
            load::<AgentRun>(&new.join("agent.json")).unwrap_or_default(),
        );
        let (gb, gn) = (group(&b, |r| r.objects), group(&n, |r| r.objects));
        for (objects, rb) in &gb {
            let Some(rn) = gn.get(objects) else { continue };
            out.push(row(
                format!("agent first apply of {objects} objects, s"),
                rb,
                rn,
                2,
                |r| r.agent_apply_s,
            ));
            out.push(row(
                format!("kubectl apply --server-side of {objects} objects, s (control)"),
                rb,
                rn,
                2,
                |r| r.kubectl_apply_s,
            ));
            out.push(row("idle agent RSS, MiB".into(), rb, rn, 1, |r| {
                r.agent_rss_kib as f64 / 1024.0
            }));
            out.push(row("idle agent CPU, % of a core".into(), rb, rn, 2, |r| {
                r.agent_cpu_pct
            }));
        }
    }
    if both("git.json") {
        let (b, n) = (
            load::<GitRun>(&base.join("git.json")).unwrap_or_default(),
            load::<GitRun>(&new.join("git.json")).unwrap_or_default(),
        );
        let (rb, rn): (Vec<&GitRun>, Vec<&GitRun>) = (b.iter().collect(), n.iter().collect());
        let bundles = b.first().map(|r| r.bundles).unwrap_or_default();
        out.push(row(
            format!("hub cold fetch + render of {bundles} bundles, s"),
            &rb,
            &rn,
            2,
            |r| r.cold_s,
        ));
        out.push(row(
            format!("hub after a one-bundle commit, s ({bundles} bundles)"),
            &rb,
            &rn,
            2,
            |r| r.incremental_s,
        ));
        out.push(row("git clone, s (control)".into(), &rb, &rn, 2, |r| {
            r.clone_s
        }));
    }
    out
}

/// The comparison as a Markdown table.
pub fn table(base_label: &str, new_label: &str, rows: &[Row]) -> String {
    let mut s = format!("| figure | {base_label} | {new_label} | change |\n|---|---:|---:|---|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.what,
            r.base.show(r.digits),
            r.new.show(r.digits),
            r.verdict()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(min: f64, median: f64, max: f64) -> Summary {
        Summary {
            median,
            min,
            max,
            runs: 3,
        }
    }

    #[test]
    fn overlapping_ranges_are_noise_and_others_are_named() {
        let r = |base, new| Row {
            what: "x".into(),
            base,
            new,
            digits: 0,
        };
        assert_eq!(
            r(s(1.0, 2.0, 3.0), s(2.5, 3.0, 4.0)).verdict(),
            "within noise"
        );
        assert_eq!(
            r(s(1.0, 2.0, 3.0), s(3.5, 4.0, 5.0)).verdict(),
            "+100% (higher)"
        );
        assert_eq!(
            r(s(3.5, 4.0, 5.0), s(1.0, 2.0, 3.0)).verdict(),
            "-50% (lower)"
        );
    }
}
