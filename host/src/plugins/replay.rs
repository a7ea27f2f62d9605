//! `switchyard plugins replay`: recorded transactions (see [`super::record`]) asked again of
//! another chain, step by step, with the recorded clock and DNS answers, and nothing sent: what
//! the chain decides now is compared with what it decided then. Policy CI for a plugin
//! repository: a change of verdict is a failed run.
//!
//! The chain's kv store starts empty (a temporary SQLite file) and the transactions are replayed
//! in the order they were recorded, so a plugin that keeps state (a greylist) builds it as it
//! did, from the recorded traffic alone. WASI's own clocks and random numbers are live: a
//! plugin whose answers depend on them is not deterministic, recorded or not.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::host::{BodyHandle, SessionFacts};
use super::record::{data_verdict_of, verdict_of, Input, Recording, SharedTape, Tape, FORMAT};
use super::{canary, PluginManager, PluginRun, RunContext};

/// A step whose verdict is not the recorded one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The transaction's queue id.
    pub id: String,
    pub stage: &'static str,
    pub subject: String,
    pub old: String,
    pub new: String,
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Report {
    pub transactions: usize,
    /// Steps asked again.
    pub steps: usize,
    /// Data steps recorded without the message (`bodies = false`): not asked.
    pub skipped: usize,
    pub changes: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: not a recording: {message}")]
    Format { path: String, message: String },
    #[error("{path}: recording format {found}; this version replays format {FORMAT}")]
    Version { path: String, found: u32 },
}

/// Every recording of `directory` (`*.json`), in the order they were recorded.
pub fn read_recordings(directory: &Path) -> Result<Vec<Recording>, ReplayError> {
    let read_error = |path: &Path, error: std::io::Error| ReplayError::Read {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let mut files: Vec<_> = std::fs::read_dir(directory)
        .map_err(|error| read_error(directory, error))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .collect();
    files.sort();
    let mut recordings = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read(&path).map_err(|error| read_error(&path, error))?;
        let recording: Recording =
            serde_json::from_slice(&text).map_err(|error| ReplayError::Format {
                path: path.display().to_string(),
                message: error.to_string(),
            })?;
        if recording.format != FORMAT {
            return Err(ReplayError::Version {
                path: path.display().to_string(),
                found: recording.format,
            });
        }
        recordings.push(recording);
    }
    recordings.sort_by_key(|recording| recording.at);
    Ok(recordings)
}

/// Asks `manager`'s chains every step of `recordings`.
pub async fn replay(manager: &PluginManager, recordings: &[Recording]) -> Report {
    let mut report = Report::default();
    for recording in recordings {
        report.transactions += 1;
        replay_one(manager, recording, &mut report).await;
    }
    report
}

async fn replay_one(manager: &PluginManager, recording: &Recording, report: &mut Report) {
    let tape: SharedTape = Arc::new(Mutex::new(Tape {
        replaying: true,
        now: recording.at,
        dns: recording.dns.clone(),
    }));
    let context = RunContext {
        tape: Some(tape.clone()),
        ..RunContext::default()
    };
    // The same draw as the recorded transaction: a canary of the new chain takes it if it
    // would have taken it live.
    let draw = canary::draw_of(&recording.id);
    let mut run = PluginRun::new(manager.current().for_draw(draw), context);
    run.draw = Some(draw);
    for step in &recording.steps {
        tape.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .now = step.at;
        let Some(verdict) = ask(manager, &mut run, &recording.id, &step.input).await else {
            continue;
        };
        let Some(verdict) = verdict else {
            report.skipped += 1;
            continue;
        };
        report.steps += 1;
        if verdict != step.verdict {
            report.changes.push(Change {
                id: recording.id.clone(),
                stage: step.input.stage(),
                subject: step.input.subject(),
                old: step.verdict.clone(),
                new: verdict,
            });
        }
    }
}

/// The chain's answer to one recorded step: `None` for a step that decides nothing (entering or
/// leaving a tenant's chain), `Some(None)` for a data step recorded without the message.
async fn ask(
    manager: &PluginManager,
    run: &mut PluginRun,
    id: &str,
    input: &Input,
) -> Option<Option<String>> {
    let session = |facts: &SessionFacts| Arc::new(facts.clone());
    let verdict = match input {
        Input::Connect { session: facts } => {
            verdict_of(&run.connect(&session(facts)).await, None, None)
        }
        Input::Helo {
            session: facts,
            name,
        } => verdict_of(&run.helo(&session(facts), name).await, None, None),
        Input::Auth {
            session: facts,
            mechanism,
            identity,
        } => verdict_of(
            &run.auth(&session(facts), mechanism, identity).await,
            None,
            None,
        ),
        Input::MailFrom {
            session: facts,
            sender,
            params,
        } => {
            let (decision, rewritten) = run.mail_from(&session(facts), sender, params).await;
            verdict_of(&decision, Some(sender), Some(&rewritten))
        }
        Input::TenantMailFrom {
            session: facts,
            sender,
            params,
        } => {
            let (decision, rewritten) = run.tenant_mail_from(&session(facts), sender, params).await;
            verdict_of(&decision, Some(sender), Some(&rewritten))
        }
        Input::RcptTo {
            session: facts,
            envelope,
            recipient,
            params,
        } => {
            let (decision, rewritten) = run
                .rcpt_to(&session(facts), envelope, recipient, params)
                .await;
            verdict_of(&decision, Some(recipient), Some(&rewritten))
        }
        Input::Data {
            session: facts,
            envelope,
            auth,
            content,
            scans,
        } => {
            let Some(content) = content else {
                return Some(None);
            };
            run.set_queue_id(id);
            let (decision, edits) = run
                .data(
                    &session(facts),
                    envelope,
                    auth,
                    &BodyHandle::scanned(content.clone(), scans.clone().into()),
                )
                .await;
            data_verdict_of(&decision, &edits)
        }
        Input::EnterTenant { tenant } => {
            // A tenant the new configuration lacks: the global chain alone goes on.
            let _ = run.enter_tenant(&manager.set_for(tenant));
            return None;
        }
        Input::LeaveTenant => {
            run.leave_tenant();
            return None;
        }
    };
    Some(Some(verdict))
}

impl Report {
    /// The changes, one per line (message, stage, subject, old verdict, new verdict), and a
    /// summary line.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for change in &self.changes {
            out.push_str(&format!(
                "changed  message {}  {}  {}\n  was: {}\n  now: {}\n",
                change.id, change.stage, change.subject, change.old, change.new
            ));
        }
        out.push_str(&format!(
            "{} transactions, {} steps replayed, {} changed, {} data steps not replayed (recorded without the message)\n",
            self.transactions,
            self.steps,
            self.changes.len(),
            self.skipped
        ));
        out
    }
}
