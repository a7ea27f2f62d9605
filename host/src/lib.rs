//! Switchyard: a mail transfer agent whose policy lives in WebAssembly plugins.
//!
//! The pipeline, in the order a message travels: [`smtp::server`] accepts it, [`queue`] makes it
//! durable, [`delivery`] routes and sends it with [`smtp::client`], retrying or bouncing.

pub mod accounts;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod metrics;
pub mod net;
pub mod plugins;
pub mod queue;
pub mod serve;
pub mod services;
pub mod shutdown;
pub mod smtp;
