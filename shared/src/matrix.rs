//! The cluster × bundle matrix the web UI shows: filtered, aggregated and cut
//! into pages on the hub, so a browser never receives (or recomputes) the whole
//! fleet. Pure: the hub hands in the rows it holds and gets one page back.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::labels::Labels;
use crate::selector::LabelSelector;
use crate::state::BundleState;

/// The most rows one page may ask for.
pub const MAX_PER_PAGE: usize = 500;
/// Rows per page unless asked otherwise.
pub const DEFAULT_PER_PAGE: usize = 50;

/// One cluster: its labels, whether its agent is connected, and the state of
/// each bundle assigned to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub cluster: String,
    pub labels: Labels,
    pub connected: bool,
    pub states: BTreeMap<String, BundleState>,
}

/// What the matrix is asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// Clusters whose name contains this.
    pub cluster: Option<String>,
    /// Columns: bundles whose name contains this.
    pub bundle: Option<String>,
    /// Clusters whose labels match.
    pub selector: Option<LabelSelector>,
    /// Clusters with at least one shown bundle in this state.
    pub state: Option<BundleState>,
    /// From 1.
    pub page: usize,
    pub per_page: usize,
}

/// One page of the matrix.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// The columns, sorted.
    pub bundles: Vec<String>,
    /// This page's rows, sorted by cluster name.
    pub rows: Vec<Row>,
    /// Clusters in the fleet.
    pub total: usize,
    /// Clusters the filters kept (every page).
    pub matched: usize,
    /// Deployments of the kept clusters and shown bundles, by state (every page).
    pub counts: BTreeMap<BundleState, usize>,
    /// Kept clusters with their agent connected.
    pub connected: usize,
    pub page: usize,
    pub pages: usize,
    pub per_page: usize,
}

/// Filters `rows` by `q`, counts what was kept, and returns page `q.page`
/// (clamped to the last one). The columns are every bundle assigned to any
/// cluster whose name contains `q.bundle`.
/// Only the rows of the page are copied: the fleet's rows are read, not moved.
pub fn page<R: std::borrow::Borrow<Row>>(rows: &[R], q: &Query) -> Page {
    let total = rows.len();
    let per_page = match q.per_page {
        0 => DEFAULT_PER_PAGE,
        n => n.min(MAX_PER_PAGE),
    };
    let shown = |b: &str| q.bundle.as_deref().is_none_or(|f| b.contains(f));
    let mut bundles = std::collections::BTreeSet::new();
    let mut counts = BTreeMap::new();
    let mut connected = 0;
    let mut kept: Vec<&Row> = Vec::new();
    for row in rows {
        let row: &Row = row.borrow();
        if q.cluster
            .as_deref()
            .is_some_and(|f| !row.cluster.contains(f))
            || q.selector.as_ref().is_some_and(|s| !s.matches(&row.labels))
        {
            continue;
        }
        let mut states = row.states.iter().filter(|(b, _)| shown(b));
        if q.state
            .is_some_and(|want| !states.clone().any(|(_, s)| *s == want))
        {
            continue;
        }
        for (b, s) in states.by_ref() {
            if !bundles.contains(b.as_str()) {
                bundles.insert(b.clone());
            }
            *counts.entry(*s).or_insert(0) += 1;
        }
        connected += usize::from(row.connected);
        kept.push(row);
    }
    kept.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    let matched = kept.len();
    let pages = matched.div_ceil(per_page).max(1);
    let page = q.page.clamp(1, pages);
    let rows = kept
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|r| Row {
            states: r
                .states
                .iter()
                .filter(|(b, _)| shown(b))
                .map(|(b, s)| (b.clone(), *s))
                .collect(),
            cluster: r.cluster.clone(),
            labels: r.labels.clone(),
            connected: r.connected,
        })
        .collect();
    Page {
        bundles: bundles.into_iter().collect(),
        rows,
        total,
        matched,
        counts,
        connected,
        page,
        pages,
        per_page,
    }
}

/// A state by its name as the API spells it (`Ready`, `ErrApplied`, ...).
pub fn parse_state(s: &str) -> Option<BundleState> {
    BundleState::ALL
        .into_iter()
        .find(|b| format!("{b:?}").eq_ignore_ascii_case(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use BundleState::*;

    fn row(name: &str, env: &str, states: &[(&str, BundleState)]) -> Row {
        Row {
            cluster: name.into(),
            labels: [("env".to_string(), env.to_string())].into(),
            connected: env == "prod",
            states: states.iter().map(|(b, s)| (b.to_string(), *s)).collect(),
        }
    }

    fn fleet() -> Vec<Row> {
        vec![
            row("edge-2", "dev", &[("web", Ready), ("db", ErrApplied)]),
            row("edge-1", "prod", &[("web", Ready)]),
            row("core-1", "prod", &[("web", NotReady), ("db", Ready)]),
        ]
    }

    #[test]
    fn no_filter_sorts_counts_and_pages() {
        let p = page(
            &fleet(),
            &Query {
                per_page: 2,
                page: 1,
                ..Query::default()
            },
        );
        assert_eq!(p.total, 3);
        assert_eq!(p.matched, 3);
        assert_eq!(p.pages, 2);
        assert_eq!(p.bundles, ["db", "web"]);
        let names: Vec<_> = p.rows.iter().map(|r| r.cluster.as_str()).collect();
        assert_eq!(names, ["core-1", "edge-1"]);
        assert_eq!(p.counts[&Ready], 3);
        assert_eq!(p.counts[&ErrApplied], 1);
        assert_eq!(p.counts[&NotReady], 1);
        assert_eq!(p.connected, 2);
    }

    #[test]
    fn a_page_past_the_end_is_the_last() {
        let p = page(
            &fleet(),
            &Query {
                per_page: 2,
                page: 99,
                ..Query::default()
            },
        );
        assert_eq!(p.page, 2);
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].cluster, "edge-2");
    }

    #[test]
    fn filters_by_name_selector_state_and_bundle() {
        let by_state = page(
            &fleet(),
            &Query {
                state: Some(ErrApplied),
                ..Query::default()
            },
        );
        assert_eq!(by_state.matched, 1);
        assert_eq!(by_state.rows[0].cluster, "edge-2");

        let by_selector = page(
            &fleet(),
            &Query {
                selector: Some(LabelSelector::parse("env=prod").unwrap()),
                ..Query::default()
            },
        );
        assert_eq!(by_selector.matched, 2);
        assert_eq!(by_selector.counts.get(&ErrApplied), None);

        let by_name = page(
            &fleet(),
            &Query {
                cluster: Some("edge".into()),
                bundle: Some("db".into()),
                ..Query::default()
            },
        );
        assert_eq!(by_name.matched, 2);
        assert_eq!(by_name.bundles, ["db"]);
        assert_eq!(by_name.counts.values().sum::<usize>(), 1);

        // The state filter looks only at the shown bundles.
        let none = page(
            &fleet(),
            &Query {
                bundle: Some("web".into()),
                state: Some(ErrApplied),
                ..Query::default()
            },
        );
        assert_eq!(none.matched, 0);
        assert_eq!(none.pages, 1);
        assert!(none.rows.is_empty());
    }

    #[test]
    fn a_huge_page_size_is_capped() {
        let rows: Vec<Row> = (0..1200)
            .map(|i| row(&format!("c{i:04}"), "dev", &[]))
            .collect();
        let p = page(
            &rows,
            &Query {
                per_page: usize::MAX,
                page: 1,
                ..Query::default()
            },
        );
        assert_eq!(p.per_page, MAX_PER_PAGE);
        assert_eq!(p.rows.len(), MAX_PER_PAGE);
        assert_eq!(p.pages, 3);
    }

    #[test]
    fn states_parse_by_name() {
        assert_eq!(parse_state("errapplied"), Some(ErrApplied));
        assert_eq!(parse_state("Ready"), Some(Ready));
        assert_eq!(parse_state("<script>"), None);
    }
}
