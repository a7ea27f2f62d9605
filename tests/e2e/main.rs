//! End-to-end tests: the real `switchyard` binary, real TCP, a real DNS server and receiving SMTP
//! servers on loopback addresses.

mod harness;

mod admin;
mod check_config;
mod cluster;
mod crash;
mod delivery;
mod dkim;
mod dsn;
mod examples;
mod filtering;
mod handoff;
mod implicit_tls;
mod plugins;
mod rollout;
mod scaffold;
mod shaping;
mod shutdown;
mod smtp_in;
mod smuggling;
mod submission;
mod tenants;
mod tls;
mod trace;
mod trust;
