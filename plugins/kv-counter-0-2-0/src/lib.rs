//! `kv-counter-0-2-0`: a plugin built against `switchyard:plugin@0.2.0` exactly as released,
//! from the frozen copy of its WIT in `wit/` (not the SDK, which follows the current version).
//! The host of a later 0.2.x must keep loading it: it imports `kv@0.2.0` and exports
//! `hooks@0.2.0`. It counts recipients per sender in the kv store and refuses past `limit`
//! (the JSON config `{"limit": N}`), so a test sees both its imports and its exports work.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
    });

    use exports::switchyard::plugin::hooks::Guest;
    use switchyard::plugin::kv;
    use switchyard::plugin::message::Body;
    use switchyard::plugin::types::{
        AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DataVerdict,
        DeliveryReport, Envelope, MessageFacts, NextHop, Param, PluginInfo, Reply, Session,
        Verdict,
    };

    static LIMIT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

    fn next() -> AddressDecision {
        AddressDecision {
            verdict: Verdict::Continue,
            rewrite: None,
        }
    }

    struct Counter;

    impl Guest for Counter {
        fn init(config: String) -> Result<PluginInfo, String> {
            // `{"limit": N}`, read without a JSON crate: the number after the colon.
            let limit = config
                .split(':')
                .nth(1)
                .map(|rest| rest.trim_matches(|c: char| !c.is_ascii_digit()))
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| format!("config needs {{\"limit\": N}}, got {config}"))?;
            LIMIT.store(limit, std::sync::atomic::Ordering::Relaxed);
            Ok(PluginInfo {
                hooks: vec!["rcpt-to".to_string()],
            })
        }
        fn connect(_: &Session) -> Verdict {
            Verdict::Continue
        }
        fn helo(_: &Session, _: String) -> Verdict {
            Verdict::Continue
        }
        fn auth(_: &Session, _: String, _: String) -> Verdict {
            Verdict::Continue
        }
        fn mail_from(_: &Session, _: String, _: Vec<Param>) -> AddressDecision {
            next()
        }
        fn rcpt_to(_: &Session, envelope: Envelope, _: String, _: Vec<Param>) -> AddressDecision {
            let count = kv::increment(&format!("rcpt:{}", envelope.sender), 1, 3600);
            if count > LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
                AddressDecision {
                    verdict: Verdict::Reject(Reply {
                        code: 550,
                        enhanced: "5.7.1".to_string(),
                        text: format!("recipient {count} refused by a 0.2.0 plugin"),
                    }),
                    rewrite: None,
                }
            } else {
                next()
            }
        }
        fn data(_: &Session, _: Envelope, _: AuthResults, _: &Body) -> DataDecision {
            DataDecision {
                verdict: DataVerdict::Continue,
                edits: Vec::new(),
            }
        }
        fn route(_: MessageFacts, _: String) -> NextHop {
            NextHop::Continue
        }
        fn delivery_result(_: DeliveryReport) {}
        fn bounce(_: BounceReport) -> Option<BounceText> {
            None
        }
    }

    export!(Counter);
}
