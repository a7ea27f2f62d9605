pub mod certs;
pub mod client;
pub mod dns;
pub mod peers;
pub mod process;
pub mod router;
pub mod scanners;
pub mod sink;
