//! Operating a running router: the admin HTTP API ([`server`]), the actions it and the CLI take
//! on the queue ([`actions`]), the JSON they exchange ([`views`]), the tokens that guard it
//! ([`tokens`]), and the CLI's side of the API ([`client`]): `switchyard queue ...` goes through
//! the API when the server runs with `[admin] listen`, and to the queue directly when it does
//! not answer.

pub mod actions;
pub mod client;
pub mod server;
pub mod tokens;
pub mod views;
