//! Routing: the next hop of each recipient, from the route hooks when a plugin implements one,
//! else from the configuration (`route.rs`: routes, smarthost, MX). A hook may also settle a
//! recipient at once (discard, fail); a hook's answer that the host cannot use (an invalid domain
//! or smarthost, a mailbox without `[mailboxes] root`) defers the recipient instead.

use std::sync::Arc;

use bytes::Bytes;

use super::observe::plugin_facts;
use super::outcome::Attempt;
use super::route::{self, NextHop};
use super::Dispatcher;
use crate::config::{HostPort, TlsPolicy};
use crate::mail::address::{domain_key, is_domain, Mailbox};
use crate::mail::reply::Reply;
use crate::plugins::bindings::types as wit;
use crate::plugins::chain::{reply_of, RouteDecision};
use crate::plugins::hooks::HookKind;
use crate::plugins::{PluginRun, PluginSet};
use crate::queue::{MessageMeta, RecipientRow};

/// Where a route hook's answer sends a recipient: a hop, or a reply that settles it now.
enum Routed {
    Hop(NextHop),
    Settled(Reply),
}

impl Dispatcher {
    /// The next hop from the configuration alone: routes, smarthost, MX.
    pub(super) fn static_hop(&self, address: &str) -> NextHop {
        let domain = Mailbox::from_stored(address)
            .map(|mailbox| mailbox.domain)
            .unwrap_or_default();
        route::next_hop(&self.config, &domain)
    }

    /// Asks the route hooks for each recipient; settles at once the recipients they discard or
    /// fail, and queues the rest.
    pub(super) async fn route_with_plugins(
        self: Arc<Self>,
        set: Arc<PluginSet>,
        meta: Arc<MessageMeta>,
        recipients: Vec<RecipientRow>,
        content: Option<Bytes>,
        held: Option<PluginRun>,
    ) {
        let mut run = self.plugin_run(&set, &meta, held);
        let facts = plugin_facts(&meta);
        let mut routed = Vec::new();
        let mut settled = Vec::new();
        for recipient in recipients {
            let decision = run.route(&facts, &recipient.address).await;
            match self.hop_for(decision, &recipient.address) {
                Routed::Hop(hop) => routed.push((hop, recipient)),
                Routed::Settled(reply) => settled.push(Attempt {
                    recipient,
                    reply,
                    relay: "plugin".to_string(),
                    tls: crate::net::verify::TlsState::None,
                    dsn_passed: false,
                }),
            }
        }
        if let Some(mut record) = run.take_trace("route") {
            let hops = routed
                .iter()
                .map(|(hop, recipient)| format!("{} -> {}", recipient.address, hop.key()));
            let refused = settled.iter().map(|attempt| {
                format!(
                    "{} -> {}",
                    attempt.recipient.address,
                    attempt.reply.one_line()
                )
            });
            record.outcome = hops.chain(refused).collect::<Vec<_>>().join("; ");
            record.sender = meta.sender.clone();
            record.recipients = routed
                .iter()
                .map(|(_, recipient)| recipient.address.clone())
                .chain(settled.iter().map(|a| a.recipient.address.clone()))
                .collect();
            self.plugins.traces().submit(record);
        }
        let mut run = Some(run);
        if !settled.is_empty() {
            // The run goes with the settled recipients when nothing else is left to deliver.
            let plugins = if routed.is_empty() { run.take() } else { None };
            self.settle(&meta, content.clone(), settled, plugins).await;
        }
        let run = run.and_then(|run| {
            self.plugins
                .hold(run, &[HookKind::DeliveryResult, HookKind::Bounce])
        });
        self.queue_jobs(meta, content, routed, run);
    }

    /// What a route hook's decision means for one recipient.
    fn hop_for(&self, decision: RouteDecision, address: &str) -> Routed {
        // A plugin's answer the host cannot use defers the recipient (the operator can fix the
        // plugin) instead of reaching DNS, logs and DSNs.
        let unusable = |what: &str| {
            Routed::Settled(Reply::new(
                451,
                "4.3.5",
                format!("a routing plugin named an invalid {what}"),
            ))
        };
        let hop = match decision {
            RouteDecision::Continue | RouteDecision::Hop(wit::NextHop::Continue) => {
                self.static_hop(address)
            }
            RouteDecision::Hop(wit::NextHop::Mx(domain)) => {
                if !is_domain(&domain) {
                    return unusable("domain");
                }
                NextHop::Mx {
                    domain: domain_key(&domain),
                }
            }
            RouteDecision::Hop(wit::NextHop::Smarthost(smarthost)) => {
                // A host name as strict as one in the configuration.
                let Ok(parsed) = smarthost.host.parse::<HostPort>() else {
                    return unusable("smarthost");
                };
                let host = HostPort {
                    host: parsed.host,
                    port: Some(smarthost.port),
                };
                let tls = match smarthost.tls {
                    wit::TlsPolicy::None => TlsPolicy::None,
                    wit::TlsPolicy::Opportunistic => TlsPolicy::Opportunistic,
                    wit::TlsPolicy::Require => TlsPolicy::Require,
                };
                NextHop::Relay { host, tls }
            }
            RouteDecision::Hop(wit::NextHop::Mailbox(name)) => {
                let mailboxes = &self.config.mailboxes;
                if mailboxes.root.is_none() && mailboxes.lmtp.is_none() {
                    // Keep the mail rather than lose it: the operator can add the setting.
                    return Routed::Settled(Reply::new(
                        451,
                        "4.3.5",
                        format!(
                            "mailbox `{}`: no [mailboxes] root is configured",
                            crate::mail::text::one_line(&name)
                        ),
                    ));
                }
                NextHop::Mailbox { name }
            }
            RouteDecision::Hop(wit::NextHop::Discard) => {
                return Routed::Settled(Reply::new(250, "2.0.0", "discarded by a routing plugin"))
            }
            RouteDecision::Hop(wit::NextHop::Fail(reply)) => {
                // A 4xx defers the recipient, anything else fails it.
                let permanent = !(400..500).contains(&reply.code);
                return Routed::Settled(reply_of(reply, permanent));
            }
            RouteDecision::Failed(reply) => return Routed::Settled(reply),
        };
        Routed::Hop(hop)
    }
}
