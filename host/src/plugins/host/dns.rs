//! The `dns` interface (granted with "dns"): TXT and address lookups through the host's resolver.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::dns;
use crate::plugins::record::DnsAnswer;

impl dns::Host for HostState {
    // A lookup waits for the network with the plugin's place in its tenant's CPU share given
    // up (see `HostState::off_cpu`).
    async fn txt(&mut self, name: String) -> Result<Vec<String>, String> {
        self.lookup("txt", name).await
    }

    async fn ip(&mut self, name: String) -> Result<Vec<String>, String> {
        self.lookup("ip", name).await
    }
}

impl HostState {
    /// A lookup through the resolver (noted on the run's tape when it records), or from the
    /// recording on replay.
    async fn lookup(&mut self, kind: &'static str, name: String) -> Result<Vec<String>, String> {
        let tape = self.tape.clone();
        if let Some(tape) = &tape {
            let tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if tape.replaying {
                return tape.answer(kind, &name);
            }
        }
        let Some(resolver) = self.resolver.clone() else {
            return Err("no resolver".to_string());
        };
        let answer = self
            .off_cpu(async {
                match kind {
                    "txt" => resolver.txt(&name).await,
                    _ => resolver.ips(&name).await,
                }
            })
            .await;
        if let Some(tape) = &tape {
            let mut tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            tape.dns.push(DnsAnswer {
                kind: kind.to_string(),
                name,
                answer: answer.clone(),
            });
        }
        answer
    }
}

/// Adds the `dns` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    dns::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
