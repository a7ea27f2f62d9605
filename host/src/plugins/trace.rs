//! The decision trace: every hook call of a run, noted as it returns (hook, plugin, verdict,
//! edits, time taken, failure), taken from the run when its transaction or delivery stage ends
//! and written in batches by the [`TraceSink`]. Also where a plugin's refusal is logged with its
//! name, trace on or off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::calls::{Describe, Described, RunTrace};
use super::hooks::HookKind;
use super::run::{FailureKind, PluginFailure, PluginRun};
use crate::config::FailurePolicy;
use crate::queue::now_millis;
use crate::queue::traces::{PendingTrace, TraceStore, TracedScan};

/// Whether runs note their calls: `[trace] enabled`, set at start and at each reload.
static TRACING: AtomicBool = AtomicBool::new(false);

pub fn set_tracing(on: bool) {
    TRACING.store(on, Ordering::Relaxed);
}

pub(super) fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Why a call failed, for its trace.
fn failure_text<R>(result: &Result<R, PluginFailure>) -> Option<String> {
    result
        .as_ref()
        .err()
        .map(|failure| format!("{:?}: {}", failure.kind, failure.message))
}

/// An answer, or the failure standing for it, as a trace describes it.
fn describe_result<R: Describe>(result: &Result<R, PluginFailure>) -> Described {
    match result {
        Ok(answer) => answer.describe(),
        Err(failure) if failure.kind == FailureKind::CircuitOpen => {
            Described::with_detail("skipped", policy_reply(failure))
        }
        Err(failure) => Described::with_detail("failed", policy_reply(failure)),
    }
}

/// The reply a failure policy gives, in words, for the trace.
fn policy_reply(failure: &PluginFailure) -> String {
    match failure.policy {
        FailurePolicy::Tempfail => "451 4.3.0 (failure policy tempfail)".to_string(),
        FailurePolicy::Reject => "550 5.3.0 (failure policy reject)".to_string(),
        FailurePolicy::Continue => "skipped (failure policy continue)".to_string(),
    }
}

impl PluginRun {
    /// Notes a hook call of plugin `index` that began at `started`: in the run's trace when
    /// tracing, and in the log when the plugin refused (or failed and its policy refuses).
    pub(super) fn note<R: Describe>(
        &mut self,
        index: usize,
        hook: HookKind,
        started: Instant,
        subject: Option<&str>,
        result: &Result<R, PluginFailure>,
    ) {
        let refused = match result {
            Ok(answer) => answer.refuses(),
            Err(failure) => failure.policy != FailurePolicy::Continue,
        };
        if self.trace.is_none() && !refused {
            return;
        }
        let described = describe_result(result);
        let plugin = &self.set.plugins[index];
        if refused {
            tracing::info!(
                plugin = %plugin.name,
                tenant = %plugin.owner,
                hook = hook.name(),
                subject = subject.unwrap_or("-"),
                queue_id = self.context.queue_id.as_deref().unwrap_or("-"),
                reply = described.detail.as_deref().unwrap_or("-"),
                "plugin refused"
            );
        }
        let generation = if plugin.owner.is_empty() {
            self.set.generation
        } else {
            self.set.tenant_generation
        };
        let failure = failure_text(result);
        if let Some(trace) = &mut self.trace {
            trace.push(
                plugin, generation, hook, started, subject, described, failure,
            );
        }
    }

    /// Compares the answer of plugin `index`'s shadow candidate (`candidate`, begun at
    /// `started`) with the live one's (`live`): counts agreement, and notes the candidate's
    /// call in the trace with it. Never changes what the chain decides.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn compare_shadow<R: Describe>(
        &mut self,
        index: usize,
        hook: HookKind,
        started: Instant,
        subject: Option<&str>,
        live: &Result<R, PluginFailure>,
        candidate: &Result<R, PluginFailure>,
    ) {
        let plugin = &self.set.plugins[index];
        let Some(shadow) = &plugin.shadow else {
            return;
        };
        let (live_said, mut said) = (describe_result(live), describe_result(candidate));
        let agrees = live_said == said;
        let stats = &plugin.stats;
        if agrees {
            stats.shadow_agree.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.shadow_disagree.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(
            "switchyard_plugin_shadow_total",
            "plugin" => plugin.name.to_string(),
            "hook" => hook.name(),
            "result" => if agrees { "agree" } else { "disagree" },
        )
        .increment(1);
        let Some(trace) = &mut self.trace else {
            return;
        };
        let verdict = if agrees { "agrees" } else { "disagrees" };
        said.detail = Some(match said.detail {
            Some(detail) => format!("{detail} [{verdict}]"),
            None => format!("[{verdict}]"),
        });
        let generation = self.set.generation;
        trace.push(
            shadow,
            generation,
            hook,
            started,
            subject,
            said,
            failure_text(candidate),
        );
    }

    /// The calls noted since the last take, as a record of `phase` (the caller fills in the
    /// message, client, envelope and outcome). `None` when tracing is off for this run.
    pub fn take_trace(&mut self, phase: &'static str) -> Option<PendingTrace> {
        let trace = self.trace.as_mut()?;
        let (mut calls, plugins, scans) = trace.take();
        let at = now_millis();
        for call in &mut calls {
            call.0 -= at;
        }
        Some(PendingTrace {
            message_id: self.context.queue_id.clone(),
            at,
            phase,
            client_ip: String::new(),
            sender: String::new(),
            recipients: Vec::new(),
            outcome: String::new(),
            plugins,
            calls,
            scans,
        })
    }

    /// Notes what the scanners said about the transaction's message, if tracing.
    pub fn note_scans(&mut self, scans: &[crate::scan::ScanResult]) {
        if let Some(trace) = &mut self.trace {
            trace.scans.extend(scans.iter().map(|scan| TracedScan {
                scanner: scan.scanner.clone(),
                result: scan.summary(),
                millis: scan.millis,
            }));
        }
    }

    /// Whether the run notes its calls for the trace.
    pub fn traced(&self) -> bool {
        self.trace.is_some()
    }

    /// Starts noting calls, if tracing is on.
    pub(super) fn new_trace() -> Option<Box<RunTrace>> {
        tracing_on().then(Box::default)
    }
}

/// Queue depth of records waiting to be written; past it records are dropped and counted
/// (`switchyard_trace_dropped_total`): tracing must never hold up mail.
const PENDING: usize = 10_000;
/// Records written in one transaction at most.
const BATCH: usize = 512;
/// How long the writer gathers records before writing them: one commit (one fsync) per this
/// much time at most, instead of one per record, so traces never compete with mail for the
/// disk.
const GATHER: Duration = Duration::from_millis(250);

/// How often records older than `[trace] keep` are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

async fn prune_old(store: &dyn TraceStore, keep: Duration) {
    let keep_millis = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let before = now_millis().saturating_sub(keep_millis);
    match store.prune_traces(before).await {
        Ok(0) => {}
        Ok(pruned) => tracing::debug!(pruned, "old decision traces pruned"),
        Err(error) => tracing::warn!(%error, "cannot prune decision traces"),
    }
}

/// Where finished records go: a task writing them in batches to the trace store, and pruning
/// those older than the retention.
#[derive(Clone, Default)]
pub struct TraceSink {
    sender: Option<mpsc::Sender<PendingTrace>>,
}

impl TraceSink {
    /// A sink that drops everything (tracing off, or tools that do not serve).
    pub fn off() -> TraceSink {
        TraceSink::default()
    }

    /// Starts the writer. Records older than `keep` are pruned every few minutes.
    pub fn start(store: Arc<dyn TraceStore>, keep: Duration) -> TraceSink {
        let (sender, mut receiver) = mpsc::channel::<PendingTrace>(PENDING);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            // Pruning runs on its own clock, so an idle server (or one with tracing turned
            // off) forgets old records too.
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            loop {
                batch.clear();
                tokio::select! {
                    received = receiver.recv_many(&mut batch, BATCH) => {
                        if received == 0 {
                            break;
                        }
                    }
                    _ = prune.tick() => {
                        prune_old(store.as_ref(), keep).await;
                        continue;
                    }
                }
                if batch.len() < BATCH {
                    tokio::time::sleep(GATHER).await;
                    while batch.len() < BATCH {
                        match receiver.try_recv() {
                            Ok(record) => batch.push(record),
                            Err(_) => break,
                        }
                    }
                }
                if let Err(error) = store.append_traces(&batch).await {
                    metrics::counter!("switchyard_trace_dropped_total")
                        .increment(batch.len() as u64);
                    tracing::warn!(%error, records = batch.len(), "cannot store decision traces");
                }
            }
        });
        TraceSink {
            sender: Some(sender),
        }
    }

    /// Hands a record to the writer; never waits.
    pub fn submit(&self, record: PendingTrace) {
        let Some(sender) = &self.sender else {
            return;
        };
        if sender.try_send(record).is_err() {
            metrics::counter!("switchyard_trace_dropped_total").increment(1);
        }
    }
}
