//! Rendering bundles as the hub renders them, for the hub's source pollers and
//! the offline `flotilla render`: `render` runs the plans `flotilla_shared::fleetyaml`
//! makes (plain YAML in process, `helm template` and `kustomize build` as child
//! processes), `sandbox` confines those tools. No Git, store or network server here,
//! so the CLI links this crate and none of the hub's server dependencies.

// One reviewed exception: `sandbox::enter_empty_network`.
#![deny(unsafe_code)]

pub mod render;
pub mod sandbox;
