//! `[admin]`: the admin HTTP API's listener and who may use it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The admin API. Off unless `listen` is set; every request needs a bearer token from
/// `tokens_file`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where to serve the API, for example "127.0.0.1:8025". A loopback address unless
    /// `allow_remote` says otherwise: the API speaks plain HTTP, so a token sent across a
    /// network can be read on the way (put a TLS proxy in front for remote use).
    pub listen: Option<SocketAddr>,
    /// One token per line (blank lines and lines starting with `#` are skipped), each at least
    /// 16 characters. Required with `listen`. Read at every request (a token removed is refused
    /// at once); a new path takes a restart.
    pub tokens_file: Option<PathBuf>,
    /// Allow `listen` on an address that is not loopback.
    pub allow_remote: bool,
}
