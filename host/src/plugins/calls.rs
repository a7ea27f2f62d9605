//! The calls a run notes for its decision trace, and how each hook's answer reads there. Kept
//! apart from the run (which holds a [`RunTrace`]) and from `trace.rs` (which fills it from
//! the run's calls), so neither needs the other to describe a call.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use super::bindings::types::{AddressDecision, BounceText, DataDecision, DataVerdict, NextHop};
use super::bindings::types::{Edit, TlsPolicy, Verdict};
use super::hooks::HookKind;
use super::plugin::LoadedPlugin;
use super::reply::reply_of;
use crate::queue::now_millis;
use crate::queue::traces::{StoredCall, TracedPlugin, TracedScan};

/// The calls a run noted since its trace was last taken (each with its absolute time until the
/// record is taken), and the plugins they name, resolved when each call is noted: a run's set
/// changes when it enters or leaves a tenant's chain, so an index into it would not last.
#[derive(Default)]
pub(super) struct RunTrace {
    calls: Vec<StoredCall>,
    plugins: Vec<TracedPlugin>,
    /// Each plugin of `plugins` by the address of its `LoadedPlugin`.
    seen: Vec<(usize, u16)>,
    /// The last call's subject: the next plugin asked about the same address shares it.
    last_subject: Option<Arc<str>>,
    /// What the scanners said, before the data hooks.
    pub(super) scans: Vec<TracedScan>,
}

impl RunTrace {
    /// The calls noted so far and the plugins they name; the trace starts afresh.
    pub(super) fn take(&mut self) -> (Vec<StoredCall>, Vec<TracedPlugin>, Vec<TracedScan>) {
        self.seen.clear();
        self.last_subject = None;
        (
            std::mem::take(&mut self.calls),
            std::mem::take(&mut self.plugins),
            std::mem::take(&mut self.scans),
        )
    }

    /// Notes one call of `plugin` (of chain generation `generation`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push(
        &mut self,
        plugin: &Arc<LoadedPlugin>,
        generation: u64,
        hook: HookKind,
        started: Instant,
        subject: Option<&str>,
        described: Described,
        failure: Option<String>,
    ) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let at = now_millis() - i64::try_from(micros / 1000).unwrap_or(0);
        let key = Arc::as_ptr(plugin) as usize;
        let position = match self.seen.iter().find(|(seen, _)| *seen == key) {
            Some((_, position)) => *position,
            None => {
                let position = u16::try_from(self.plugins.len()).unwrap_or(u16::MAX);
                self.plugins.push(TracedPlugin {
                    name: plugin.name.to_string(),
                    tenant: plugin.owner.to_string(),
                    generation,
                    sha256: plugin.digest_hex(),
                });
                self.seen.push((key, position));
                position
            }
        };
        let subject = subject.map(|text| match &self.last_subject {
            Some(last) if **last == *text => last.clone(),
            _ => {
                let shared: Arc<str> = Arc::from(crate::mail::text::one_line(text).as_ref());
                self.last_subject = Some(shared.clone());
                shared
            }
        });
        self.calls.push(StoredCall(
            at,
            Cow::Borrowed(hook.name()),
            position,
            Cow::Borrowed(described.verdict),
            micros,
            subject,
            described.detail,
            described.rewrite,
            failure,
            described.edits,
        ));
    }
}

/// How a hook's answer reads in a trace.
#[derive(PartialEq, Eq)]
pub(super) struct Described {
    pub(super) verdict: &'static str,
    pub(super) detail: Option<String>,
    pub(super) rewrite: Option<String>,
    pub(super) edits: Vec<String>,
}

impl Described {
    fn plain(verdict: &'static str) -> Described {
        Described {
            verdict,
            detail: None,
            rewrite: None,
            edits: Vec::new(),
        }
    }

    pub(super) fn with_detail(verdict: &'static str, detail: String) -> Described {
        Described {
            detail: Some(detail),
            ..Described::plain(verdict)
        }
    }
}

/// A hook's result, as a trace describes it.
pub(super) trait Describe {
    /// Whether the answer could matter to an operator even without a trace (a refusal).
    fn refuses(&self) -> bool;
    fn describe(&self) -> Described;
}

fn describe_verdict(verdict: &Verdict) -> Described {
    match verdict {
        Verdict::Continue => Described::plain("continue"),
        Verdict::Accept => Described::plain("accept"),
        Verdict::Reject(reply) => {
            Described::with_detail("reject", reply_of(reply.clone(), true).one_line())
        }
        Verdict::Tempfail(reply) => {
            Described::with_detail("tempfail", reply_of(reply.clone(), false).one_line())
        }
    }
}

impl Describe for Verdict {
    fn refuses(&self) -> bool {
        matches!(self, Verdict::Reject(_) | Verdict::Tempfail(_))
    }

    fn describe(&self) -> Described {
        describe_verdict(self)
    }
}

impl Describe for AddressDecision {
    fn refuses(&self) -> bool {
        self.verdict.refuses()
    }

    fn describe(&self) -> Described {
        Described {
            rewrite: self.rewrite.clone(),
            ..describe_verdict(&self.verdict)
        }
    }
}

impl Describe for DataDecision {
    fn refuses(&self) -> bool {
        matches!(
            self.verdict,
            DataVerdict::Reject(_) | DataVerdict::Tempfail(_)
        )
    }

    fn describe(&self) -> Described {
        let mut described = match &self.verdict {
            DataVerdict::Continue => Described::plain("continue"),
            DataVerdict::Accept => Described::plain("accept"),
            DataVerdict::Reject(reply) => {
                Described::with_detail("reject", reply_of(reply.clone(), true).one_line())
            }
            DataVerdict::Tempfail(reply) => {
                Described::with_detail("tempfail", reply_of(reply.clone(), false).one_line())
            }
            DataVerdict::Quarantine(reason) => Described::with_detail(
                "quarantine",
                crate::mail::text::one_line(reason).into_owned(),
            ),
            DataVerdict::Discard => Described::plain("discard"),
        };
        described.edits = self.edits.iter().map(describe_edit).collect();
        described
    }
}

fn describe_edit(edit: &Edit) -> String {
    super::reply::host_edit(edit.clone()).to_string()
}

impl Describe for NextHop {
    fn refuses(&self) -> bool {
        matches!(self, NextHop::Fail(_))
    }

    fn describe(&self) -> Described {
        let line = |text: &str| crate::mail::text::one_line(text).into_owned();
        match self {
            NextHop::Continue => Described::plain("continue"),
            NextHop::Mx(domain) => Described::with_detail("hop", format!("mx {}", line(domain))),
            NextHop::Smarthost(smarthost) => Described::with_detail(
                "hop",
                format!(
                    "smarthost {}:{} tls={}",
                    line(&smarthost.host),
                    smarthost.port,
                    match smarthost.tls {
                        TlsPolicy::None => "none",
                        TlsPolicy::Opportunistic => "opportunistic",
                        TlsPolicy::Require => "require",
                    }
                ),
            ),
            NextHop::Mailbox(name) => {
                Described::with_detail("hop", format!("mailbox {}", line(name)))
            }
            NextHop::Discard => Described::with_detail("hop", "discard".to_string()),
            NextHop::Fail(reply) => {
                Described::with_detail("reject", reply_of(reply.clone(), true).one_line())
            }
        }
    }
}

impl Describe for () {
    fn refuses(&self) -> bool {
        false
    }

    fn describe(&self) -> Described {
        Described::plain("observed")
    }
}

impl Describe for Option<BounceText> {
    fn refuses(&self) -> bool {
        false
    }

    fn describe(&self) -> Described {
        match self {
            Some(text) => Described::with_detail(
                "text",
                crate::mail::text::one_line(&text.subject).into_owned(),
            ),
            None => Described::plain("continue"),
        }
    }
}
