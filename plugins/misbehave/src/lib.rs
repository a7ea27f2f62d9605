//! A plugin for the host's sandbox tests. At RCPT TO it does what `mode` says to any recipient
//! whose local part is `victim`: `loop` forever, `alloc` memory without bound, `trap`, tell the
//! facts of the `session` it was lent, tell the time WASI's wall clock gives (`wasi-clock`), tell the `seed` its `init` drew (a random number: the same in every transaction when the host started
//! them from one pre-initialised snapshot, a new one when each instance ran `init`), or count in
//! the kv store (so the component imports `kv`, which a manifest may not grant), or tell how many
//! times `init` has run with mode `inits` (its `init` counts itself in the kv store).
//!
//! Mode `inject` tries to get CR, LF and NUL past the host: a reply text with a second reply in
//! it (recipient `victim`), a rewrite into an address with a command in it (recipient
//! `rewrite`), and, at DATA, header edits and an added recipient with line breaks and NUL, beside
//! one harmless header (`X-Clean: yes`) that must arrive.
//!
//! Mode `remember` looks for what an earlier instance may have left in this instance's memory,
//! then leaves it there itself: a static and a 2 MiB heap block (past the window the host wipes
//! by hand, so it is given back to the kernel instead). The reply to `victim` says `wiped` when
//! the instance started clean, else what it found.

use std::sync::atomic::{AtomicU64, Ordering};

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
    const HOOKS: &'static [Hook] = &[Hook::RcptTo, Hook::Data];

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
        if self.mode == "inject" && recipient.starts_with("rewrite@") {
            return AddressDecision::rewrite("rewritten@switchyard.test>\r\nRCPT TO:<x@y.test");
        }
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
            "inject" => AddressDecision::reject(
                550,
                "5.7.1",
                "refused\r\n250 2.1.5 Ok\0 (a forged second reply)",
            ),
            "remember" => AddressDecision::reject(550, "5.7.1", remember()),
            "seed" => AddressDecision::reject(550, "5.7.1", format!("seed {}", self.seed)),
            // What WASI's wall clock says: the real time only with the `clock` grant.
            "wasi-clock" => {
                let since_epoch = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_secs())
                    .unwrap_or(0);
                AddressDecision::reject(550, "5.7.1", format!("wasi clock {since_epoch}"))
            }
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

    fn data(&self, _: &Session, _: &Envelope, _: &AuthResults, _: &Body) -> DataDecision {
        if self.mode != "inject" {
            return DataDecision::next();
        }
        DataDecision::next()
            .add_header("X-Injected", "a\r\nBcc: everyone@switchyard.test")
            .add_header("X-Nul", "a\0b")
            .add_header("X-Bad\r\nInjected", "v")
            .replace_header("Subject", "new\r\nBcc: everyone@switchyard.test")
            .add_recipient("extra@switchyard.test>\r\nRCPT TO:<x@y.test")
            .add_header("X-Clean", "yes")
    }
}

/// What an earlier instance would leave behind.
const MARK: u64 = 0x5EC2_E7F0_0D5E_C2E7;
/// Large enough that dlmalloc takes it straight from `memory.grow` and trusts it to be zero, and
/// beyond the window the host wipes by hand.
const BLOCK: usize = 2 << 20;

static LEFT_BEHIND: AtomicU64 = AtomicU64::new(0);

fn remember() -> String {
    let mut found = Vec::new();
    if LEFT_BEHIND.swap(MARK, Ordering::Relaxed) == MARK {
        found.push("the static".to_string());
    }
    let layout = std::alloc::Layout::from_size_align(BLOCK, 8).expect("layout");
    // SAFETY: the layout is not zero-sized; the block is read and written only within it and
    // never freed (the instance ends with the transaction).
    unsafe {
        let block = std::alloc::alloc_zeroed(layout).cast::<u64>();
        if block.is_null() {
            return "no memory".to_string();
        }
        let words = BLOCK / 8;
        let dirty = (0..words)
            .filter(|&i| block.add(i).read_volatile() != 0)
            .count();
        if dirty > 0 {
            found.push(format!("{dirty} non-zero words in a fresh heap block"));
        }
        for i in 0..words {
            block.add(i).write_volatile(MARK);
        }
    }
    if found.is_empty() {
        "wiped".to_string()
    } else {
        format!("leaked: {}", found.join(", "))
    }
}

export_plugin!(Misbehave);
