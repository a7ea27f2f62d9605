//! A plugin for the host's sandbox tests. At RCPT TO it does what `mode` says to any recipient
//! whose local part is `victim`: `loop` forever, `alloc` memory without bound, `trap`, tell the
//! facts of the `session` it was lent, tell the `seed` its `init` drew (a random number: the same in every transaction when the host started
//! them from one pre-initialised snapshot, a new one when each instance ran `init`), or count in
//! the kv store (so the component imports `kv`, which a manifest may not grant), or tell how many
//! times `init` has run with mode `inits` (its `init` counts itself in the kv store).

use serde::Deserialize;
use switchyard_plugin_sdk::host::kv;
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
pub struct Config {
    pub mode: String,
}

pub struct Misbehave {
    mode: String,
    /// Drawn by `init` from the instance's random source.
    seed: u64,
}

impl Plugin for Misbehave {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::RcptTo];

    fn new(config: Config) -> Result<Self, String> {
        use std::hash::BuildHasher;
        // A fresh `RandomState` is keyed from the WASI random source the first time.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0u8);
        if config.mode == "inits" {
            kv::increment("inits", 1, 3600);
        }
        Ok(Misbehave {
            mode: config.mode,
            seed,
        })
    }

    fn rcpt_to(
        &self,
        session: &Session,
        _: &Envelope,
        recipient: &str,
        _: &[Param],
    ) -> AddressDecision {
        if !recipient.starts_with("victim@") {
            return AddressDecision::next();
        }
        match self.mode.as_str() {
            "loop" => {
                let mut counter: u64 = 0;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("misbehave: trapping on purpose"),
            "seed" => AddressDecision::reject(550, "5.7.1", format!("seed {}", self.seed)),
            "inits" => {
                let inits = kv::increment("inits", 0, 3600);
                AddressDecision::reject(550, "5.7.1", format!("inits {inits}"))
            }
            "session" => AddressDecision::reject(
                550,
                "5.7.1",
                format!(
                    "ip={} listener={} submission={} helo={} tls={} auth={} tenant={}",
                    session.client_ip(),
                    session.listener(),
                    session.submission(),
                    session.helo().unwrap_or_default(),
                    session.tls(),
                    session.auth_identity().unwrap_or_default(),
                    session.tenant(),
                ),
            ),
            _ => {
                let seen = kv::increment("victims", 1, 60);
                AddressDecision::reject(550, "5.7.1", format!("victim number {seen}"))
            }
        }
    }
}

export_plugin!(Misbehave);
