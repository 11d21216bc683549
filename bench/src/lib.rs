//! Flotilla's benchmarks: a load generator of simulated agents that speak the real
//! protocol over real mutual TLS (reusing the agent's enrolment and transport code),
//! a byte-counting proxy, the rollout planner's cost per step, the web UI's and
//! `/metrics`' server time at fleet scale, readings of a process's memory, CPU and file descriptors
//! from /proc, and the report (BENCHMARKS.md and an SVG figure).
//!
//! Nothing here asserts a number: benchmarks measure, tests enforce behaviour.

pub mod cluster;
pub mod compare;
pub mod hubproc;
pub mod planner;
pub mod procstat;
/// The byte-counting proxy lives with the e2e tests, which count with it too.
pub use flotilla_tests::counting as proxy;
pub mod report;
/// Simulated agents live in `flotilla-tests`, shared with the torture tests.
pub use flotilla_tests::sim;
pub mod stats;
pub mod ui;
