//! The `boxd` binary's library: configuration, the admin socket, node composition and the CLI
//! entry points. The binary (`main.rs`) only parses arguments and calls [`cli::main`].

pub mod admin;
pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod error;
pub mod host;
pub mod https;
pub mod identity;
pub mod images;
pub mod metrics;
pub mod node;
pub mod ssh;
pub mod status;
pub mod worker;
