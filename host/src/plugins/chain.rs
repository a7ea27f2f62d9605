//! Chain semantics, the same at every stage: plugins are asked in configuration order; the first
//! answer other than `continue` decides and the rest are not asked; rewrites and edits
//! accumulate (each plugin sees the envelope as earlier plugins left it). A plugin that fails
//! answers with its failure policy: `tempfail` (451 4.3.0, the default) or `reject` (550 5.3.0)
//! decide; `continue` skips it. A plugin never makes the host accept or drop mail by failing.

use wasmtime::component::{Resource, ResourceTableError};
use wasmtime::Store;

use std::sync::Arc;
use std::time::Instant;

use super::bindings::types::{
    self as wit, AddressDecision, AuthResults, BounceReport, BounceText, DataVerdict,
    DeliveryReport, Envelope, MessageFacts, NextHop, Verdict,
};
use super::facts;
use super::hooks::HookKind;
use super::host::{BodyHandle, HostState, SessionFacts, SessionHandle};
use super::reply::host_edit;
pub use super::reply::reply_of;
use super::run::{PluginFailure, PluginRun};
use super::store::arm;
use crate::config::FailurePolicy;
use crate::mail::edit::Edit;
use crate::mail::reply::Reply;

/// A stage's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody decided: the host's own rules apply.
    Continue,
    Accept,
    Reject(Reply),
    Tempfail(Reply),
}

/// The data stage's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDecision {
    Continue,
    Accept,
    Reject(Reply),
    Tempfail(Reply),
    Quarantine(String),
    Discard,
}

/// The route stage's decision for one recipient.
#[derive(Debug, Clone)]
pub enum RouteDecision {
    /// Nobody decided: configured routes and MX apply.
    Continue,
    Hop(NextHop),
    /// A plugin failed: defer or fail the recipient with this reply.
    Failed(Reply),
}

fn failure_reply(failure: &PluginFailure) -> Option<Decision> {
    let text = format!("plugin {} failed", failure.plugin);
    match failure.policy {
        FailurePolicy::Tempfail => Some(Decision::Tempfail(Reply::new(
            451,
            "4.3.0",
            format!("{text}, try again later"),
        ))),
        FailurePolicy::Reject => Some(Decision::Reject(Reply::new(550, "5.3.0", text))),
        FailurePolicy::Continue => None,
    }
}

/// A verdict hook's answer, or its failure policy: `Some` decides the stage.
fn settle(answer: Result<Verdict, PluginFailure>) -> Option<Decision> {
    match answer {
        Ok(verdict) => decision_of(verdict),
        Err(failure) => failure_reply(&failure),
    }
}

/// Like [`settle`] for address hooks, applying the rewrite to `address` first.
fn settle_address(
    answer: Result<AddressDecision, PluginFailure>,
    address: &mut String,
) -> Option<Decision> {
    match answer {
        Ok(AddressDecision { verdict, rewrite }) => {
            if let Some(rewritten) = rewrite {
                *address = rewritten;
            }
            decision_of(verdict)
        }
        Err(failure) => failure_reply(&failure),
    }
}

fn decision_of(verdict: Verdict) -> Option<Decision> {
    match verdict {
        Verdict::Continue => None,
        Verdict::Accept => Some(Decision::Accept),
        Verdict::Reject(reply) => Some(Decision::Reject(reply_of(reply, true))),
        Verdict::Tempfail(reply) => Some(Decision::Tempfail(reply_of(reply, false))),
    }
}

/// Calls one hook on plugin `$index` of `$run` with its time limit armed, accounting for the
/// result: `(result, started)`.
macro_rules! answer {
    ($run:expr, $index:expr, $hook:expr, $method:ident ( $($arg:expr),* )) => {{
        let started = Instant::now();
        let limit = $run.set.plugins[$index].manifest.time_limit;
        let result = match $run.instance($index).await {
            Err(failure) => Err(failure),
            Ok((store, hooks)) => {
                let _running = arm(store, limit);
                let result = hooks.$method(store, $($arg),*).await;
                $run.finish($index, $hook, started, result)
            }
        };
        (result, started)
    }};
}

/// Like `answer!` for a hook whose first argument is the session: lends the instance a
/// `session` handle for the call and takes it back after.
macro_rules! answer_in_session {
    ($run:expr, $index:expr, $hook:expr, $session:expr, $method:ident ( $($arg:expr),* )) => {{
        let started = Instant::now();
        let limit = $run.set.plugins[$index].manifest.time_limit;
        let result = match $run.instance($index).await {
            Err(failure) => Err(failure),
            Ok((store, hooks)) => {
                let result = match lend(store, SessionHandle(Arc::clone($session))) {
                    Ok(handle) => {
                        let _running = arm(store, limit);
                        let result = hooks
                            .$method(store, borrow(&handle), $($arg),*)
                            .await;
                        let _ = store.data_mut().table.delete(handle);
                        result
                    }
                    Err(error) => Err(wasmtime::format_err!("cannot lend the session: {error}")),
                };
                $run.finish($index, $hook, started, result)
            }
        };
        (result, started)
    }};
}

/// Calls one hook on plugin `$index`, notes it for the trace (`$subject`: what the call is
/// about, if one thing), and asks the plugin's shadow candidate the same, if it has one.
macro_rules! call {
    ($run:expr, $index:expr, $hook:expr, $subject:expr, $method:ident ( $($arg:expr),* )) => {{
        let (result, started) = answer!($run, $index, $hook, $method($($arg),*));
        $run.note($index, $hook, started, $subject, &result);
        let shadowed = match $run.shadow_of($index, $hook) {
            Some(shadow) => Some(answer!(shadow, $index, $hook, $method($($arg),*))),
            None => None,
        };
        if let Some((candidate, candidate_started)) = shadowed {
            $run.compare_shadow($index, $hook, candidate_started, $subject, &result, &candidate);
        }
        result
    }};
}

/// Like `call!` for a hook whose first argument is the session.
macro_rules! call_in_session {
    ($run:expr, $index:expr, $hook:expr, $subject:expr, $session:expr,
     $method:ident ( $($arg:expr),* )) => {{
        let (result, started) =
            answer_in_session!($run, $index, $hook, $session, $method($($arg),*));
        $run.note($index, $hook, started, $subject, &result);
        let shadowed = match $run.shadow_of($index, $hook) {
            Some(shadow) => Some(answer_in_session!(
                shadow,
                $index,
                $hook,
                $session,
                $method($($arg),*)
            )),
            None => None,
        };
        if let Some((candidate, candidate_started)) = shadowed {
            $run.compare_shadow($index, $hook, candidate_started, $subject, &result, &candidate);
        }
        result
    }};
}

/// Puts `value` in the instance's resource table for one call: the host keeps the owning
/// handle (and deletes it after the call), the guest gets [`borrow`]s of it.
fn lend<T: Send + 'static>(
    store: &mut Store<HostState>,
    value: T,
) -> Result<Resource<T>, ResourceTableError> {
    store.data_mut().table.push(value)
}

/// The borrow of a lent handle that a call passes to the guest.
fn borrow<T: 'static>(lent: &Resource<T>) -> Resource<T> {
    Resource::new_borrow(lent.rep())
}

impl PluginRun {
    pub async fn connect(&mut self, session: &Arc<SessionFacts>) -> Decision {
        for index in self.implementing(HookKind::Connect) {
            if let Some(decision) = settle(call_in_session!(
                self,
                index,
                HookKind::Connect,
                None,
                session,
                call_connect()
            )) {
                return decision;
            }
        }
        Decision::Continue
    }

    pub async fn helo(&mut self, session: &Arc<SessionFacts>, name: &str) -> Decision {
        for index in self.implementing(HookKind::Helo) {
            if let Some(decision) = settle(call_in_session!(
                self,
                index,
                HookKind::Helo,
                Some(name),
                session,
                call_helo(name)
            )) {
                return decision;
            }
        }
        Decision::Continue
    }

    pub async fn auth(
        &mut self,
        session: &Arc<SessionFacts>,
        mechanism: &str,
        identity: &str,
    ) -> Decision {
        for index in self.implementing(HookKind::Auth) {
            if let Some(decision) = settle(call_in_session!(
                self,
                index,
                HookKind::Auth,
                Some(identity),
                session,
                call_auth(mechanism, identity)
            )) {
                return decision;
            }
        }
        Decision::Continue
    }

    /// Returns the decision and the sender after every rewrite.
    pub async fn mail_from(
        &mut self,
        session: &Arc<SessionFacts>,
        sender: &str,
        params: &[facts::Param],
    ) -> (Decision, String) {
        self.mail_from_part(session, sender, params, 0).await
    }

    /// The mail-from hooks of the tenant's part of the chain alone: for inbound mail, whose
    /// tenant is known only at its first recipient, after the global chain answered MAIL.
    pub async fn tenant_mail_from(
        &mut self,
        session: &Arc<SessionFacts>,
        sender: &str,
        params: &[facts::Param],
    ) -> (Decision, String) {
        let start = self.set.global_len;
        self.mail_from_part(session, sender, params, start).await
    }

    async fn mail_from_part(
        &mut self,
        session: &Arc<SessionFacts>,
        sender: &str,
        params: &[facts::Param],
        start: usize,
    ) -> (Decision, String) {
        let mut sender = sender.to_string();
        if !self
            .implementing(HookKind::MailFrom)
            .any(|index| index >= start)
        {
            return (Decision::Continue, sender);
        }
        let params = &facts::Param::to_wit(params);
        for index in self
            .implementing(HookKind::MailFrom)
            .filter(move |&index| index >= start)
        {
            let answer = call_in_session!(
                self,
                index,
                HookKind::MailFrom,
                Some(sender.as_str()),
                session,
                call_mail_from(&sender, params)
            );
            if let Some(decision) = settle_address(answer, &mut sender) {
                return (decision, sender);
            }
        }
        (Decision::Continue, sender)
    }

    /// Returns the decision and the recipient after every rewrite.
    pub async fn rcpt_to(
        &mut self,
        session: &Arc<SessionFacts>,
        envelope: &facts::Envelope,
        recipient: &str,
        params: &[facts::Param],
    ) -> (Decision, String) {
        let mut recipient = recipient.to_string();
        if self.implementing(HookKind::RcptTo).next().is_none() {
            return (Decision::Continue, recipient);
        }
        let (envelope, params) = (&envelope.to_wit(), &facts::Param::to_wit(params));
        for index in self.implementing(HookKind::RcptTo) {
            let answer = call_in_session!(
                self,
                index,
                HookKind::RcptTo,
                Some(recipient.as_str()),
                session,
                call_rcpt_to(envelope, &recipient, params)
            );
            if let Some(decision) = settle_address(answer, &mut recipient) {
                return (decision, recipient);
            }
        }
        (Decision::Continue, recipient)
    }

    /// Asks the data hooks; returns the decision and the edits of every plugin asked, in order.
    pub async fn data(
        &mut self,
        session: &Arc<SessionFacts>,
        envelope: &facts::Envelope,
        auth: &facts::Auth,
        body: &BodyHandle,
    ) -> (DataDecision, Vec<Edit>) {
        let mut edits = Vec::new();
        if self.implementing(HookKind::Data).next().is_none() {
            return (DataDecision::Continue, edits);
        }
        let (envelope, auth) = (&envelope.to_wit(), &auth.to_wit());
        for index in self.implementing(HookKind::Data) {
            let (result, started) = self.data_answer(index, session, envelope, auth, body).await;
            self.note(index, HookKind::Data, started, None, &result);
            let shadowed = match self.shadow_of(index, HookKind::Data) {
                Some(shadow) => Some(
                    shadow
                        .data_answer(index, session, envelope, auth, body)
                        .await,
                ),
                None => None,
            };
            if let Some((candidate, candidate_started)) = shadowed {
                self.compare_shadow(
                    index,
                    HookKind::Data,
                    candidate_started,
                    None,
                    &result,
                    &candidate,
                );
            }
            match result {
                Ok(answer) => {
                    let decision = match answer.verdict {
                        DataVerdict::Continue => None,
                        DataVerdict::Accept => Some(DataDecision::Accept),
                        DataVerdict::Reject(reply) => {
                            Some(DataDecision::Reject(reply_of(reply, true)))
                        }
                        DataVerdict::Tempfail(reply) => {
                            Some(DataDecision::Tempfail(reply_of(reply, false)))
                        }
                        // The reason is shown by `queue show` and in logs: one line.
                        DataVerdict::Quarantine(reason) => Some(DataDecision::Quarantine(
                            crate::mail::text::one_line(&reason).into_owned(),
                        )),
                        DataVerdict::Discard => Some(DataDecision::Discard),
                    };
                    edits.extend(answer.edits.into_iter().map(host_edit));
                    if let Some(decision) = decision {
                        return (decision, edits);
                    }
                }
                Err(failure) => {
                    if let Some(decision) = failure_reply(&failure) {
                        return (data_decision(decision), edits);
                    }
                }
            }
        }
        (DataDecision::Continue, edits)
    }

    /// One data hook call: the message and the session lent to plugin `index` for the call.
    async fn data_answer(
        &mut self,
        index: usize,
        session: &Arc<SessionFacts>,
        envelope: &Envelope,
        auth: &AuthResults,
        body: &BodyHandle,
    ) -> (Result<wit::DataDecision, PluginFailure>, Instant) {
        let started = Instant::now();
        let limit = self.set.plugins[index].manifest.time_limit;
        let (store, hooks) = match self.instance(index).await {
            Ok(instance) => instance,
            Err(failure) => return (Err(failure), started),
        };
        let lent = lend(store, body.clone()).and_then(|body| {
            match lend(store, SessionHandle(Arc::clone(session))) {
                Ok(session) => Ok((body, session)),
                Err(error) => {
                    let _ = store.data_mut().table.delete(body);
                    Err(error)
                }
            }
        });
        let result = match lent {
            Ok((body, lent_session)) => {
                let _running = arm(store, limit);
                let result = hooks
                    .call_data(store, borrow(&lent_session), envelope, auth, borrow(&body))
                    .await;
                let table = &mut store.data_mut().table;
                let _ = table.delete(body);
                let _ = table.delete(lent_session);
                result
            }
            Err(error) => Err(wasmtime::format_err!(
                "cannot hand the message to the plugin: {error}"
            )),
        };
        (self.finish(index, HookKind::Data, started, result), started)
    }

    pub async fn route(&mut self, message: &MessageFacts, recipient: &str) -> RouteDecision {
        for index in self.implementing(HookKind::Route) {
            match call!(
                self,
                index,
                HookKind::Route,
                Some(recipient),
                call_route(message, recipient)
            ) {
                Ok(NextHop::Continue) => {}
                Ok(hop) => return RouteDecision::Hop(hop),
                Err(failure) => match failure_reply(&failure) {
                    Some(Decision::Tempfail(reply)) | Some(Decision::Reject(reply)) => {
                        return RouteDecision::Failed(reply)
                    }
                    _ => {}
                },
            }
        }
        RouteDecision::Continue
    }

    /// Tells every delivery-result plugin; failures are logged and otherwise ignored (observation
    /// only).
    pub async fn delivery_result(&mut self, report: &DeliveryReport) {
        for index in self.implementing(HookKind::DeliveryResult) {
            let _ = call!(
                self,
                index,
                HookKind::DeliveryResult,
                None,
                call_delivery_result(report)
            );
        }
    }

    /// The first bounce text a plugin offers.
    pub async fn bounce(&mut self, report: &BounceReport) -> Option<BounceText> {
        for index in self.implementing(HookKind::Bounce) {
            if let Ok(Some(text)) = call!(self, index, HookKind::Bounce, None, call_bounce(report))
            {
                return Some(text);
            }
        }
        None
    }
}

fn data_decision(decision: Decision) -> DataDecision {
    match decision {
        Decision::Continue => DataDecision::Continue,
        Decision::Accept => DataDecision::Accept,
        Decision::Reject(reply) => DataDecision::Reject(reply),
        Decision::Tempfail(reply) => DataDecision::Tempfail(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::bindings::types::Reply as WitReply;

    /// A plugin's reply text cannot add reply lines or carry NUL into the session.
    #[test]
    fn reply_text_is_one_line() {
        let reply = reply_of(
            WitReply {
                code: 550,
                enhanced: "5.7.1".into(),
                text: "no\r\n250 2.0.0 Ok: queued\0".into(),
            },
            true,
        );
        assert_eq!(reply.to_wire(), "550 5.7.1 no  250 2.0.0 Ok: queued \r\n");
        // A code of the wrong class, or an enhanced code with a line break, is replaced.
        let reply = reply_of(
            WitReply {
                code: 250,
                enhanced: "2.0.0\r\n".into(),
                text: "x".into(),
            },
            false,
        );
        assert_eq!((reply.code, reply.enhanced.as_str()), (451, "4.7.1"));
    }

    /// The chain's semantics with real components from `plugins/` (built by
    /// `scripts/build-plugins`): the first answer other than `continue` decides, rewrites and
    /// edits accumulate in chain order, and a failing plugin answers with its failure policy.
    mod semantics {
        use std::path::PathBuf;
        use std::sync::Arc;
        use std::time::Duration;

        use crate::config::{FailurePolicy, Grant, PluginManifest};
        use crate::mail::edit::{Edit, Header};
        use crate::mail::reply::Reply;
        use crate::plugins::chain::{DataDecision, Decision};
        use crate::plugins::engine::{new_engine_with, PoolTuning};
        use crate::plugins::host::{BodyHandle, SessionFacts};
        use crate::plugins::{PluginManager, PluginRun, PluginServices, RunContext};

        fn manifest(name: &str, component: &str, config: &str) -> PluginManifest {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/wasm32-wasip2/plugin")
                .join(format!("{}.wasm", component.replace('-', "_")));
            assert!(
                path.is_file(),
                "{} is missing: run scripts/build-plugins",
                path.display()
            );
            PluginManifest {
                name: name.to_string(),
                path,
                grants: vec![Grant::Kv],
                time_limit: Duration::from_secs(5),
                memory_limit: 32 * 1024 * 1024,
                failure_policy: FailurePolicy::Tempfail,
                config: toml::from_str(config).expect("plugin config"),
                preinitialize: true,
                sha256: None,
                breaker: Default::default(),
                shadow: None,
                canary: None,
            }
        }

        async fn chain(manifests: &[PluginManifest]) -> (Arc<PluginManager>, tempfile::TempDir) {
            let dir = tempfile::tempdir().expect("tempdir");
            let tuning = PoolTuning {
                instances: 16,
                pagemap_scan: false,
            };
            let engine = new_engine_with(tuning).expect("engine");
            let manager = PluginManager::start(engine, manifests, &[], PluginServices::default())
                .await
                .expect("chain loads");
            (manager, dir)
        }

        fn session() -> Arc<SessionFacts> {
            Arc::new(SessionFacts {
                client_ip: "192.0.2.1".into(),
                listener: "test".into(),
                submission: false,
                helo: Some("client.test".into()),
                tls: false,
                auth_identity: None,
                tenant: String::new(),
            })
        }

        fn run(manager: &PluginManager) -> PluginRun {
            manager.run(RunContext::default())
        }

        fn no_checks() -> crate::plugins::facts::Auth {
            crate::plugins::facts::Auth::default()
        }

        fn envelope() -> crate::plugins::facts::Envelope {
            crate::plugins::facts::Envelope {
                sender: "s@sender.test".into(),
                recipients: Vec::new(),
            }
        }

        #[tokio::test]
        async fn a_later_plugin_sees_an_earlier_rewrite_and_the_first_decider_wins() {
            let rewrite = manifest(
                "rewrite",
                "address-rewrite",
                "recipients = { \"info@x.test\" = \"victim@x.test\" }",
            );
            let seed = manifest("seed", "misbehave", "mode = \"seed\"");
            let never = manifest("never-asked", "misbehave", "mode = \"trap\"");
            let (manager, _dir) = chain(&[rewrite, seed, never]).await;
            let mut run = run(&manager);
            let (decision, address) = run
                .rcpt_to(&session(), &envelope(), "info@x.test", &[])
                .await;
            assert_eq!(address, "victim@x.test", "the rewrite is kept");
            match decision {
                Decision::Reject(reply) => assert!(
                    reply.one_line().starts_with("550 5.7.1 seed "),
                    "the second plugin decided on the rewritten address: {reply:?}"
                ),
                other => panic!("{other:?}"),
            }
            // The third plugin (which would trap) was not asked.
            let listing = manager.describe();
            let never_asked = listing
                .lines()
                .find(|line| line.starts_with("-  never-asked"))
                .expect("listed");
            assert!(never_asked.contains("calls=0"), "{listing}");
            assert_eq!(listing.matches("failures=0").count(), 3, "{listing}");
            // An address nobody decides on: the host's own rules apply.
            let (decision, address) = run
                .rcpt_to(&session(), &envelope(), "someone@x.test", &[])
                .await;
            assert_eq!(
                (decision, address.as_str()),
                (Decision::Continue, "someone@x.test")
            );
        }

        #[tokio::test]
        async fn a_failing_plugin_answers_with_its_failure_policy() {
            let mut skipped = manifest("skipped", "misbehave", "mode = \"trap\"");
            skipped.failure_policy = FailurePolicy::Continue;
            let seed = manifest("seed", "misbehave", "mode = \"seed\"");
            let (manager, _dir) = chain(&[skipped, seed]).await;
            let (decision, _) = run(&manager)
                .rcpt_to(&session(), &envelope(), "victim@x.test", &[])
                .await;
            assert!(
                matches!(&decision, Decision::Reject(reply) if reply.one_line().contains("seed")),
                "`continue` skips the failed plugin: {decision:?}"
            );

            let trap = manifest("trap", "misbehave", "mode = \"trap\"");
            let seed = manifest("seed", "misbehave", "mode = \"seed\"");
            let (manager, _dir) = chain(&[trap, seed]).await;
            let (decision, _) = run(&manager)
                .rcpt_to(&session(), &envelope(), "victim@x.test", &[])
                .await;
            assert_eq!(
                decision,
                Decision::Tempfail(Reply::new(
                    451,
                    "4.3.0",
                    "plugin trap failed, try again later"
                )),
                "`tempfail`, the default, decides; the next plugin is not asked"
            );
        }

        #[tokio::test]
        async fn data_edits_accumulate_in_chain_order() {
            let first = manifest(
                "first",
                "content-filter",
                "rules = [{ always = true, action = \"add-header\", name = \"X-First\", value = \"1\" }]",
            );
            let second = manifest(
                "second",
                "content-filter",
                "rules = [\n  { always = true, action = \"remove-header\", name = \"X-First\" },\n  { always = true, action = \"add-header\", name = \"X-Second\", value = \"2\" },\n]",
            );
            let (manager, _dir) = chain(&[first, second]).await;
            let body = BodyHandle::new(bytes::Bytes::from_static(b"Subject: s\r\n\r\nbody\r\n"));
            let (decision, edits) = run(&manager)
                .data(&session(), &envelope(), &no_checks(), &body)
                .await;
            assert_eq!(decision, DataDecision::Continue);
            let header = |name: &str, value: &str| Header {
                name: name.into(),
                value: value.into(),
            };
            assert_eq!(
                edits,
                [
                    Edit::AddHeader(header("X-First", "1")),
                    Edit::RemoveHeader("X-First".into()),
                    Edit::AddHeader(header("X-Second", "2")),
                ]
            );
            let edited = crate::mail::edit::apply_to_headers(b"Subject: s\r\n\r\nbody\r\n", &edits);
            assert_eq!(edited, b"X-Second: 2\r\nSubject: s\r\n\r\nbody\r\n");
        }
    }
}
