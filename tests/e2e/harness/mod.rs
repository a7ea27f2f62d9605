pub mod client;
pub mod dns;
pub mod router;
pub mod sink;
