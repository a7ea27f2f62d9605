//! The SMTP protocol: replies and addresses shared by both sides, the server that accepts mail and
//! the client that delivers it.

pub mod address;
pub mod client;
pub mod reply;
pub mod server;
pub mod text;
