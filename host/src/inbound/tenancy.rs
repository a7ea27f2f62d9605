//! Which tenant a transaction belongs to, and the tenant's limits on it.
//!
//! - Submitted mail (an authenticated client) is the tenant of the identity, fixed at AUTH; its
//!   sender must be an address of one of the tenant's domains (`553 5.7.1`), so no tenant can
//!   send as another.
//! - Inbound mail is the tenant of its first accepted recipient's domain. A recipient of another
//!   tenant (or of no tenant) in the same transaction gets `452 4.5.3`, and the client sends it
//!   again in a transaction of its own, so one message never mixes two tenants' policies.
//! - Mail of no tenant follows the global configuration, as without tenants.
//!
//! Once the tenant is known, the transaction's plugin run goes on with the tenant's chain after
//! the global one. For inbound mail that is at the first recipient: the tenant's mail-from hooks
//! are asked then, and their refusal refuses that recipient.

use crate::plugins::record::{verdict_of, Input};
use std::sync::Arc;

use super::session::Session;
use crate::config::HeaderFromPolicy;
use crate::mail::address::Mailbox;
use crate::mail::reply::Reply;
use crate::plugins::chain::Decision;
use crate::tenants::Tenant;

impl Session {
    /// The tenant of the transaction under way, or of the authenticated identity.
    pub(super) fn current_tenant(&self) -> Option<&Arc<Tenant>> {
        self.tenant.as_ref().or(self.auth_tenant.as_ref())
    }

    /// The tenant id plugins, logs and the queue see (`""`: none).
    pub(super) fn tenant_id(&self) -> String {
        self.current_tenant()
            .map(|tenant| tenant.id.to_string())
            .unwrap_or_default()
    }

    /// Counts the session against `tenant`'s sessions at once (once per session and tenant),
    /// and moves the plugin run of the transaction onto the tenant's chain.
    pub(super) fn bind_tenant(&mut self, tenant: &Arc<Tenant>) -> Result<(), Reply> {
        let bound = matches!(&self.tenant_slot, Some((id, _)) if *id == tenant.id);
        if !bound {
            self.tenant_slot = None;
            let slot = tenant
                .usage
                .open_session(tenant.limits.sessions)
                .map_err(|limited| limited.reply)?;
            self.tenant_slot = Some((tenant.id.clone(), slot));
        }
        let set = self.services.plugins.set_for(&tenant.id);
        if set.is_empty() {
            return Ok(());
        }
        let run = self.plugin_run();
        run.enter_tenant(&set).map_err(|_| {
            tracing::info!(tenant = %tenant.id, limit = "plugin_instances", "tenant limit reached");
            Reply::new(
                451,
                "4.7.1",
                format!(
                    "Tenant limit reached: {} plugin instances at once, try again later",
                    tenant.limits.plugin_instances
                ),
            )
        })
    }

    /// At AUTH, once the password is good: the identity's tenant, bound to the session before
    /// the auth hooks are asked (so the tenant's own hooks are asked too).
    pub(super) fn tenant_at_auth(&mut self, identity: &str) -> Result<(), Reply> {
        let Some(tenant) = self.services.tenants.of_user(identity) else {
            return Ok(());
        };
        self.bind_tenant(&tenant).map_err(|reply| {
            // RFC 4954 6: 454 is AUTH's temporary failure.
            Reply::new(454, &reply.enhanced, reply.lines.join(" "))
        })?;
        self.auth_tenant = Some(tenant);
        Ok(())
    }

    /// At MAIL of an authenticated client of a tenant: the sender must be the tenant's, and
    /// the tenant must have room for another message.
    pub(super) fn tenant_at_mail(
        &mut self,
        sender: Option<&Mailbox>,
        declared_size: u64,
    ) -> Result<(), Reply> {
        let Some(tenant) = self.auth_tenant.clone() else {
            return Ok(());
        };
        self.sender_is_tenants(sender)?;
        self.tenant_has_room(&tenant, declared_size)?;
        self.bind_tenant(&tenant)
    }

    /// An authenticated tenant's sender (as the client gave it, and again as the mail-from
    /// hooks left it) must be an address of one of the tenant's domains.
    pub(super) fn sender_is_tenants(&self, sender: Option<&Mailbox>) -> Result<(), Reply> {
        let (Some(tenant), Some(sender)) = (&self.auth_tenant, sender) else {
            return Ok(());
        };
        if tenant.owns_domain(&sender.domain) {
            return Ok(());
        }
        tracing::warn!(tenant = %tenant.id, from = %sender, "sender outside the tenant's domains refused");
        Err(Reply::new(
            553,
            "5.7.1",
            format!("<{sender}>: Sender address is not one of your domains"),
        ))
    }

    /// A tenant user's message must name only the tenant's domains in From: (`[submission]
    /// header_from = "own-domains"`, the default), since the tenant's DKIM key signs it: the
    /// envelope check alone lets `MAIL FROM:<me@acme.test>` carry `From: ceo@globex.test`. A
    /// message without a From: field names no one else, and passes; one whose From: field
    /// gives no address with a domain is refused, since no one can tell whose it is.
    pub(super) fn header_from_is_tenants(&self, content: &[u8]) -> Result<(), Reply> {
        let Some(tenant) = &self.auth_tenant else {
            return Ok(());
        };
        if self.config().submission.header_from == HeaderFromPolicy::Any {
            return Ok(());
        }
        let domains = crate::mail::header::from_domains(content);
        if domains.is_empty() && crate::mail::header::count(content, "From") > 0 {
            return Err(Reply::new(
                550,
                "5.7.1",
                "From: has no address of your domains (header_from = \"own-domains\")",
            ));
        }
        let Some(outside) = domains.iter().find(|domain| !tenant.owns_domain(domain)) else {
            return Ok(());
        };
        tracing::warn!(tenant = %tenant.id, from_domain = %outside, "From: outside the tenant's domains refused");
        Err(Reply::new(
            550,
            "5.7.1",
            format!(
                "From: domain {outside} is not one of your domains (header_from = \"own-domains\")"
            ),
        ))
    }

    /// Whether a recipient (rewritten by a hook, or added by a data hook) may join a tenant's
    /// inbound transaction: not when its domain is another tenant's, whose own inbound chain
    /// would be skipped. (Submitted mail goes anywhere, as it would without the rewrite.)
    pub(super) fn may_join(&self, recipient: &Mailbox) -> bool {
        let Some(ours) = &self.tenant else {
            return true;
        };
        match self.services.tenants.of_domain(&recipient.domain) {
            Some(theirs) => theirs.id == ours.id,
            None => true,
        }
    }

    /// Whether `tenant` may take another message of the transaction's declared size.
    fn tenant_has_room(&self, tenant: &Tenant, size: u64) -> Result<(), Reply> {
        let limits = &tenant.limits;
        let usage = &tenant.usage;
        usage
            .check_messages(limits.messages_per_hour)
            .and_then(|()| usage.check_queued(size, limits.queued_bytes))
            .map_err(|limited| limited.reply)
    }

    /// Whether `tenant` (none: mail of no tenant) may take one more recipient this hour, with
    /// the transaction's own recipients counted.
    fn room_for_recipient(&self, tenant: Option<&Tenant>) -> Result<(), Reply> {
        let Some(tenant) = tenant else {
            return Ok(());
        };
        tenant
            .usage
            .check_recipients(
                tenant.limits.recipients_per_hour,
                self.transaction.recipients.len(),
            )
            .map_err(|limited| limited.reply)
    }

    /// At RCPT, before the hooks: fixes the transaction's tenant at its first recipient, or
    /// refuses a recipient of another tenant. The tenant's limits apply to each recipient.
    pub(super) async fn tenant_at_rcpt(&mut self, recipient: &Mailbox) -> Result<(), Reply> {
        if !self.services.tenants.enabled() {
            return Ok(());
        }
        if self.auth_identity.is_some() {
            // Submitted mail is the identity's tenant's (or the global policy's), wherever it goes.
            return self.room_for_recipient(self.auth_tenant.as_deref());
        }
        let wanted = self.services.tenants.of_domain(&recipient.domain);
        if !self.transaction.recipients.is_empty() {
            let same = match (&self.tenant, &wanted) {
                (Some(ours), Some(theirs)) => ours.id == theirs.id,
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(Reply::new(
                    452,
                    "4.5.3",
                    format!("<{recipient}>: Recipient of another tenant; send it in a transaction of its own"),
                ));
            }
            return self.room_for_recipient(wanted.as_deref());
        }
        // The first recipient: it chooses the transaction's tenant.
        self.leave_tenant();
        let Some(tenant) = wanted else {
            return Ok(());
        };
        self.bind_tenant(&tenant)?;
        self.tenant = Some(tenant.clone());
        let room = self
            .tenant_has_room(&tenant, self.transaction.declared_size)
            .and_then(|()| self.room_for_recipient(Some(&tenant)));
        if let Err(reply) = room {
            self.leave_tenant();
            return Err(reply);
        }
        if let Err(reply) = self.ask_tenant_mail_from().await {
            self.leave_tenant();
            return Err(reply);
        }
        Ok(())
    }

    /// Forgets a tenant chosen by a first recipient that was then refused (or by a transaction
    /// that EHLO ended): the next recipient chooses again, with the sender as the global chain
    /// left it.
    pub(super) fn leave_tenant(&mut self) {
        if self.tenant.take().is_some() {
            if let Some(run) = self.run.as_mut() {
                run.leave_tenant();
            }
        }
        if let Some(sender) = self.transaction.global_sender.take() {
            self.transaction.sender = Some(sender);
        }
    }

    /// STARTTLS forgets everything learnt before it (RFC 3207 4.2), the tenant too.
    pub(super) fn forget_tenants(&mut self) {
        self.leave_tenant();
        self.auth_tenant = None;
        self.tenant_slot = None;
        if let Some(run) = self.run.as_mut() {
            run.leave_tenant();
        }
    }

    /// The tenant's mail-from hooks for inbound mail, asked when the first recipient fixed the
    /// tenant: their rewrite replaces the sender; their refusal refuses the recipient.
    async fn ask_tenant_mail_from(&mut self) -> Result<(), Reply> {
        let session = self.wit_session();
        let sender = self
            .transaction
            .sender
            .clone()
            .flatten()
            .map(|mailbox| mailbox.to_string())
            .unwrap_or_default();
        let params = self.transaction.params.clone();
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        self.transaction.global_sender = self.transaction.sender.clone();
        run.begin_step();
        let (decision, rewritten) = run.tenant_mail_from(&session, &sender, &params).await;
        run.record(
            || Input::TenantMailFrom {
                session: (*session).clone(),
                sender: sender.clone(),
                params: params.clone(),
            },
            || verdict_of(&decision, Some(&sender), Some(&rewritten)),
        );
        match decision {
            Decision::Reject(reply) | Decision::Tempfail(reply) => return Err(reply),
            Decision::Continue | Decision::Accept => {}
        }
        if rewritten != sender {
            let mailbox = if rewritten.is_empty() {
                None
            } else {
                Some(super::policy::reparse(&rewritten)?)
            };
            self.transaction.sender = Some(mailbox);
        }
        Ok(())
    }
}
