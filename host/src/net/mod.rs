//! Byte streams shared by the SMTP server and client (plain or TLS sockets, read line by line
//! with bounds), and the DNS resolver every part shares.

pub mod client_network;
pub mod conn;
pub mod dane;
pub mod dns;
pub mod input;
pub mod line;
pub mod stream;
pub mod tls;
pub mod verify;
