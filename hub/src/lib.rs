//! The hub.

pub mod cli;
pub mod git;
