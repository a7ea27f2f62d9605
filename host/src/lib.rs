//! Switchyard: a mail transfer agent whose policy lives in WebAssembly plugins.
//!
//! The pipeline, in the order a message travels: [`inbound`] accepts it over SMTP and hands it
//! to [`delivery::inbox`], [`queue`] makes it durable, [`delivery`] routes and sends it,
//! retrying or bouncing. [`plugins`] answers every stage's questions; [`mail`] is the ground floor
//! of replies, addresses and header edits that all of them share. [`admin`] is the operator's
//! door into a running router (the admin HTTP API and the CLI's side of it).

pub mod accounts;
pub mod admin;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod inbound;
pub mod mail;
pub mod metrics;
pub mod net;
pub mod plugins;
pub mod queue;
pub mod reload;
pub mod scan;
pub mod serve;
pub mod shutdown;
pub mod tenants;
