//! The hub.

pub mod git;
