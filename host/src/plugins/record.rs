//! Recording transactions for replay (`[record]`): what the chain was asked at each SMTP stage
//! (the session's facts, the envelope, the address, the message when bodies are kept), what it
//! decided, and the answers of the host functions whose results change over time (the `dns`
//! lookups; the `clock` reads the step's recorded time on replay). One JSON file per transaction;
//! `switchyard plugins replay` (see [`super::replay`]) asks another chain the same questions.
//!
//! Transactions are sampled when their plugin run starts (`percent`), and, with `refused =
//! true`, every transaction is kept in memory until it ends and written if it was refused.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use super::chain::{DataDecision, Decision};
use super::host::SessionFacts;
use super::run::PluginRun;
use crate::mail::edit::Edit;

/// Message content in a recording: base64 text.
mod base64_content {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        content: &Option<bytes::Bytes>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match content {
            Some(content) => serializer
                .serialize_some(&base64::engine::general_purpose::STANDARD.encode(content)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<bytes::Bytes>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else {
            return Ok(None);
        };
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(|content| Some(bytes::Bytes::from(content)))
            .map_err(serde::de::Error::custom)
    }
}

/// The format of recording files; replay refuses another.
pub const FORMAT: u32 = 1;

/// One recorded transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recording {
    pub format: u32,
    /// The queue id the transaction had (its message's, when it queued one).
    pub id: String,
    /// When it started, in milliseconds since the epoch.
    pub at: i64,
    pub steps: Vec<Step>,
    /// Every DNS lookup a plugin made, with the answer it got.
    pub dns: Vec<DnsAnswer>,
}

/// One question to the chain and its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// When it was asked: what the `clock` interface says during its replay.
    pub at: i64,
    #[serde(flatten)]
    pub input: Input,
    /// The chain's decision, as [`verdict_of`] and [`data_verdict_of`] word it; empty for
    /// steps that decide nothing (entering a tenant's chain).
    pub verdict: String,
}

/// The stage and what the chain was given.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
pub enum Input {
    Connect {
        session: SessionFacts,
    },
    Helo {
        session: SessionFacts,
        name: String,
    },
    Auth {
        session: SessionFacts,
        mechanism: String,
        identity: String,
    },
    MailFrom {
        session: SessionFacts,
        sender: String,
        params: Vec<Param>,
    },
    /// The tenant's part of the chain asked about the sender (inbound mail, once its tenant is
    /// known).
    TenantMailFrom {
        session: SessionFacts,
        sender: String,
        params: Vec<Param>,
    },
    RcptTo {
        session: SessionFacts,
        envelope: Envelope,
        recipient: String,
        params: Vec<Param>,
    },
    Data {
        session: SessionFacts,
        envelope: Envelope,
        auth: Auth,
        /// The message as the data hooks saw it (base64 in the file; encoded only when written);
        /// none unless `bodies = true`.
        #[serde(with = "base64_content")]
        content: Option<bytes::Bytes>,
        /// What the scanners said (replayed as said, never asked again).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scans: Vec<crate::scan::ScanResult>,
    },
    /// The transaction's tenant became known: its chain follows the global one from here.
    EnterTenant {
        tenant: String,
    },
    LeaveTenant,
}

impl Input {
    /// The stage's name, as replay prints it.
    pub fn stage(&self) -> &'static str {
        match self {
            Input::Connect { .. } => "connect",
            Input::Helo { .. } => "helo",
            Input::Auth { .. } => "auth",
            Input::MailFrom { .. } => "mail-from",
            Input::TenantMailFrom { .. } => "tenant-mail-from",
            Input::RcptTo { .. } => "rcpt-to",
            Input::Data { .. } => "data",
            Input::EnterTenant { .. } => "enter-tenant",
            Input::LeaveTenant => "leave-tenant",
        }
    }

    /// What the stage was about (the address, the HELO name), for replay's report.
    pub fn subject(&self) -> String {
        match self {
            Input::Helo { name, .. } => name.clone(),
            Input::Auth { identity, .. } => identity.clone(),
            Input::MailFrom { sender, .. } | Input::TenantMailFrom { sender, .. } => {
                format!("<{sender}>")
            }
            Input::RcptTo { recipient, .. } => format!("<{recipient}>"),
            Input::Connect { session } => session.client_ip.clone(),
            Input::Data { envelope, .. } => format!("from <{}>", envelope.sender),
            Input::EnterTenant { tenant } => tenant.clone(),
            Input::LeaveTenant => String::new(),
        }
    }
}

pub use super::facts::{Auth, Envelope, Param};

/// A `dns` lookup and its answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsAnswer {
    /// `txt` or `ip`.
    pub kind: String,
    pub name: String,
    pub answer: Result<Vec<String>, String>,
}

/// A verdict stage's decision, and the address after every rewrite when it changed.
pub fn verdict_of(decision: &Decision, given: Option<&str>, rewritten: Option<&str>) -> String {
    let mut text = match decision {
        Decision::Continue => "continue".to_string(),
        Decision::Accept => "accept".to_string(),
        Decision::Reject(reply) => format!("reject {reply}"),
        Decision::Tempfail(reply) => format!("tempfail {reply}"),
    };
    if let (Some(given), Some(rewritten)) = (given, rewritten) {
        if given != rewritten {
            text.push_str(&format!(", rewrite <{rewritten}>"));
        }
    }
    text
}

/// The data stage's decision and edits.
pub fn data_verdict_of(decision: &DataDecision, edits: &[Edit]) -> String {
    let line = |text: &str| crate::mail::text::one_line(text).into_owned();
    let mut text = match decision {
        DataDecision::Continue => "continue".to_string(),
        DataDecision::Accept => "accept".to_string(),
        DataDecision::Reject(reply) => format!("reject {reply}"),
        DataDecision::Tempfail(reply) => format!("tempfail {reply}"),
        DataDecision::Quarantine(reason) => format!("quarantine {}", line(reason)),
        DataDecision::Discard => "discard".to_string(),
    };
    for edit in edits {
        text.push_str(&format!(", {edit}"));
    }
    text
}

/// True for a verdict text that refuses.
pub fn refuses(verdict: &str) -> bool {
    verdict.starts_with("reject") || verdict.starts_with("tempfail")
}

/// What the host functions answered a run, or will answer it on replay.
#[derive(Debug, Default)]
pub struct Tape {
    /// Replaying: lookups are answered from `dns`, and the clock says `now`.
    pub replaying: bool,
    pub now: i64,
    pub dns: Vec<DnsAnswer>,
}

impl Tape {
    /// The recorded answer to a lookup (the first of that kind and name).
    pub fn answer(&self, kind: &str, name: &str) -> Result<Vec<String>, String> {
        self.dns
            .iter()
            .find(|answer| answer.kind == kind && answer.name.eq_ignore_ascii_case(name))
            .map(|answer| answer.answer.clone())
            .unwrap_or_else(|| {
                Err(format!(
                    "{name} ({kind}) was not looked up in the recording"
                ))
            })
    }
}

pub type SharedTape = Arc<Mutex<Tape>>;

/// A run's recording under way. The run's [`Tape`] (in its context, where the host functions
/// reach it) collects the lookups, which join the steps when the recording is taken.
pub struct Recorder {
    pub id: String,
    pub at: i64,
    /// When the step under way was asked (see [`PluginRun::begin_step`]).
    pub step_at: i64,
    pub steps: Vec<Step>,
    pub dns: Vec<DnsAnswer>,
    /// Written whatever its outcome (else only when refused).
    pub sampled: bool,
}

pub use crate::config::RecordSettings;

/// Where finished recordings go: files in `[record] directory`.
#[derive(Clone, Default)]
pub struct RecordSink {
    settings: Arc<ArcSwapOption<RecordSettings>>,
}

impl RecordSink {
    pub fn configure(&self, settings: Option<RecordSettings>) {
        self.settings.store(settings.map(Arc::new));
    }

    /// A recorder for a transaction starting now, if it is to be recorded.
    pub fn recorder(&self, id: &str) -> Option<Box<Recorder>> {
        let settings = self.settings.load();
        let settings = settings.as_ref()?;
        let sampled = fastrand::u32(0..10_000) < settings.basis_points;
        if !sampled && !settings.refused {
            return None;
        }
        let now = crate::queue::now_millis();
        Some(Box::new(Recorder {
            id: id.to_string(),
            at: now,
            step_at: now,
            steps: Vec::new(),
            dns: Vec::new(),
            sampled,
        }))
    }

    /// Whether message content goes into recordings.
    pub fn bodies(&self) -> bool {
        self.settings
            .load()
            .as_ref()
            .is_some_and(|settings| settings.bodies)
    }

    /// Writes a finished transaction's recording if it was sampled or refused (`refused`: its
    /// last reply refused it; a step that refused counts too).
    pub fn finish(&self, recorder: Option<Box<Recorder>>, refused: bool) {
        let Some(recorder) = recorder else { return };
        let Some(settings) = self.settings.load_full() else {
            return;
        };
        if !recorder
            .steps
            .iter()
            .any(|step| !matches!(step.input, Input::EnterTenant { .. } | Input::LeaveTenant))
        {
            return;
        }
        let refused = refused || recorder.steps.iter().any(|step| refuses(&step.verdict));
        if !(recorder.sampled || (settings.refused && refused)) {
            return;
        }
        let recording = Recording {
            format: FORMAT,
            id: recorder.id,
            at: recorder.at,
            steps: recorder.steps,
            dns: recorder.dns,
        };
        // Named by a new ULID: files sort by time, and two recordings of one transaction (cut by
        // a new greeting) never collide.
        let path = settings
            .directory
            .join(format!("{}.json", ulid::Ulid::new()));
        tokio::task::spawn_blocking(move || {
            let written = serde_json::to_vec_pretty(&recording)
                .map_err(std::io::Error::other)
                .and_then(|json| write_new(&path, &json));
            match written {
                Ok(()) => metrics::counter!("switchyard_recorded_total").increment(1),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot write a recording");
                    metrics::counter!("switchyard_record_failed_total").increment(1);
                }
            }
        });
    }
}

/// Applies `[record]` (at start and at reload), creating its directory first: a directory that
/// cannot be made is an error, and what recorded before goes on.
pub fn apply(sink: &RecordSink, settings: Option<RecordSettings>) -> std::io::Result<()> {
    if let Some(settings) = &settings {
        std::fs::create_dir_all(&settings.directory).map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!(
                    "cannot create the recording directory {}: {error}",
                    settings.directory.display()
                ),
            )
        })?;
    }
    sink.configure(settings);
    Ok(())
}

/// Writes `bytes` to a new file at `path` (written beside it, then renamed: a reader never
/// sees half a recording).
fn write_new(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

impl PluginRun {
    /// True while the run records (decide whether to build a step's input).
    pub fn recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// Notes the time a step is asked, before the chain is: what the `clock` answers on
    /// replay is what the plugins could have read live.
    pub fn begin_step(&mut self) {
        if let Some(recorder) = &mut self.recorder {
            recorder.step_at = crate::queue::now_millis();
        }
    }

    /// Records one step (its input built only when recording), asked at the last
    /// [`PluginRun::begin_step`].
    pub fn record(&mut self, input: impl FnOnce() -> Input, verdict: impl FnOnce() -> String) {
        if let Some(recorder) = &mut self.recorder {
            recorder.steps.push(Step {
                at: recorder.step_at,
                input: input(),
                verdict: verdict(),
            });
        }
    }

    /// The recording so far, ending it; the run records on into a new one (a transaction cut
    /// by a new greeting starts a new recording, as it starts a new trace).
    pub fn take_recording(&mut self) -> Option<Box<Recorder>> {
        let tenant = self.tenant().to_string();
        let recorder = self.recorder.as_mut()?;
        let now = crate::queue::now_millis();
        // A run already in a tenant's chain (bound at AUTH, which a new greeting keeps) starts
        // the next recording there, so its replay runs the same chain.
        let steps = if tenant.is_empty() {
            Vec::new()
        } else {
            vec![Step {
                at: now,
                input: Input::EnterTenant { tenant },
                verdict: String::new(),
            }]
        };
        let next = Box::new(Recorder {
            id: recorder.id.clone(),
            at: now,
            step_at: now,
            steps,
            dns: Vec::new(),
            sampled: recorder.sampled,
        });
        let mut taken = std::mem::replace(recorder, next);
        if let Some(tape) = &self.context.tape {
            let mut tape = tape.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            taken.dns = std::mem::take(&mut tape.dns);
        }
        Some(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_lookup_gets_the_recorded_answer_or_an_error() {
        let tape = Tape {
            replaying: true,
            now: 0,
            dns: vec![
                DnsAnswer {
                    kind: "txt".into(),
                    name: "Example.COM".into(),
                    answer: Ok(vec!["v=spf1 -all".into()]),
                },
                DnsAnswer {
                    kind: "ip".into(),
                    name: "gone.example".into(),
                    answer: Err("NXDOMAIN".into()),
                },
            ],
        };
        assert_eq!(
            tape.answer("txt", "example.com"),
            Ok(vec!["v=spf1 -all".to_string()])
        );
        assert_eq!(
            tape.answer("ip", "gone.example"),
            Err("NXDOMAIN".to_string())
        );
        let missing = tape
            .answer("ip", "example.com")
            .expect_err("not looked up as ip");
        assert!(
            missing.contains("not looked up in the recording"),
            "{missing}"
        );
    }

    #[test]
    fn verdicts_read_the_same_however_they_were_reached() {
        use crate::mail::reply::Reply;
        let refused = Decision::Reject(Reply::new(550, "5.7.1", "no"));
        assert_eq!(verdict_of(&refused, None, None), "reject 550 5.7.1 no");
        assert!(refuses(&verdict_of(&refused, None, None)));
        assert_eq!(
            verdict_of(&Decision::Continue, Some("a@x.test"), Some("b@x.test")),
            "continue, rewrite <b@x.test>"
        );
        assert_eq!(
            verdict_of(&Decision::Continue, Some("a@x.test"), Some("a@x.test")),
            "continue"
        );
        let edits = [Edit::RemoveRecipient("c@x.test".into())];
        assert_eq!(
            data_verdict_of(&DataDecision::Discard, &edits),
            "discard, remove-recipient c@x.test"
        );
    }
}
