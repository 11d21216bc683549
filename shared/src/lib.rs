//! Flotilla's domain: labels and selectors, sources and groups, bundles and their
//! manifests, targeting, states and join tokens.
//!
//! This crate does no I/O and knows nothing of tonic, kube, gix or sled. Everything
//! here is a pure function of its inputs, so it is tested with plain `#[test]`s.

pub mod api;
pub mod applied;
pub mod assign;
pub mod bundle;
pub mod capabilities;
pub mod caps;
pub mod depends;
pub mod documents;
pub mod drift;
pub mod error;
pub mod fleetyaml;
pub mod health;
pub mod identity;
pub mod index;
pub mod kustomization;
pub mod labels;
pub mod matrix;
pub mod notify;
pub mod objects;
pub mod oci;
pub mod paginate;
pub mod rollout;
pub mod sandbox;
pub mod selector;
pub mod signing;
pub mod state;
pub mod targeting;
pub mod token;
pub mod webhook;

pub use error::Error;

/// The field manager every object Flotilla applies is written under.
pub const FIELD_MANAGER: &str = "flotilla";

/// Label naming the bundle an object belongs to; ownership can be rebuilt from it.
pub const BUNDLE_LABEL: &str = "flotilla.io/bundle";
