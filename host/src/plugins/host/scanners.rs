//! The `scanners` interface (granted with "scanners"): what the `[[scanner]]`s said about the
//! message the data hook is deciding on, as the WIT's typed results.
//!
//! Unlike the other grants, the interface is linked for every plugin: a plugin such as
//! `content-filter` reads the results only when its configuration has rules on them, and one
//! configured without such rules loads and runs without the grant, as it did before 0.2.3. A
//! plugin that does read them without the grant fails closed (the call traps and the plugin's
//! failure policy answers), and the loader notes such a plugin in the log when it loads.

use wasmtime::component::{HasSelf, Linker, Resource};

use super::{BodyHandle, HostState};
use crate::plugins::bindings::switchyard::plugin::scanners as wit;
use crate::plugins::bindings::types::Header;
use crate::scan::{ClamavVerdict, ScanError, ScanOutcome, ScanResult};

impl wit::Host for HostState {
    async fn results(
        &mut self,
        message: Resource<BodyHandle>,
    ) -> wasmtime::Result<Vec<wit::ScanResult>> {
        if !self.plugin().scanners {
            return Err(wasmtime::Error::msg(format!(
                "plugin `{}` read scanners.results without the `scanners` grant; add \"scanners\" to its grants",
                self.plugin().name
            )));
        }
        let body = self.table.get(&message)?;
        Ok(body.scans().iter().map(to_wit).collect())
    }
}

fn to_wit(result: &ScanResult) -> wit::ScanResult {
    let outcome = match &result.outcome {
        ScanOutcome::Rspamd(report) => wit::ScanOutcome::Rspamd(wit::RspamdReport {
            score: report.score,
            required_score: report.required_score,
            action: report.action.clone(),
            symbols: report
                .symbols
                .iter()
                .map(|symbol| wit::Symbol {
                    name: symbol.name.clone(),
                    score: symbol.score,
                })
                .collect(),
            message: report.message.clone(),
            headers: report
                .headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        }),
        ScanOutcome::Clamav(ClamavVerdict::Clean) => {
            wit::ScanOutcome::Clamav(wit::ClamavReport::Clean)
        }
        ScanOutcome::Clamav(ClamavVerdict::Infected(name)) => {
            wit::ScanOutcome::Clamav(wit::ClamavReport::Infected(name.clone()))
        }
        ScanOutcome::Failed(error) => wit::ScanOutcome::Error(match error {
            ScanError::Timeout(millis) => wit::ScanError::Timeout(*millis),
            ScanError::Refused(text) => wit::ScanError::Refused(text.clone()),
            ScanError::TooLarge(limit) => wit::ScanError::TooLarge(*limit),
            ScanError::Protocol(text) => wit::ScanError::Protocol(text.clone()),
        }),
    };
    wit::ScanResult {
        scanner: result.scanner.clone(),
        outcome,
    }
}

/// Adds the `scanners` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
