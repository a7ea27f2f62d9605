//! What a tenant uses now: sessions at once, messages and recipients in the last hour, bytes in
//! the queue; and the refusal, naming the limit, when a transaction would pass one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mail::reply::Reply;

/// A limit a transaction ran into: the reply to give, counted in
/// `switchyard_tenant_limited_total{tenant, limit}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub limit: &'static str,
    pub reply: Reply,
}

/// One tenant's usage.
pub struct Usage {
    tenant: String,
    sessions: Arc<AtomicUsize>,
    messages: HourWindow,
    recipients: HourWindow,
    /// From the last count of the queue, plus what was accepted since.
    queued_bytes: AtomicU64,
}

impl Usage {
    pub fn new(tenant: &str) -> Usage {
        Usage {
            tenant: tenant.to_string(),
            sessions: Arc::new(AtomicUsize::new(0)),
            messages: HourWindow::default(),
            recipients: HourWindow::default(),
            queued_bytes: AtomicU64::new(0),
        }
    }

    fn limited(&self, limit: &'static str, reply: Reply) -> Limited {
        metrics::counter!(
            "switchyard_tenant_limited_total",
            "tenant" => self.tenant.clone(),
            "limit" => limit,
        )
        .increment(1);
        tracing::info!(tenant = %self.tenant, limit, reply = %reply, "tenant limit reached");
        Limited { limit, reply }
    }

    /// Takes one of `max` session slots, given back when the slot drops.
    pub fn open_session(&self, max: usize) -> Result<SessionSlot, Limited> {
        let taken = self
            .sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < max).then_some(now + 1)
            });
        match taken {
            Ok(_) => Ok(SessionSlot {
                sessions: self.sessions.clone(),
            }),
            Err(_) => Err(self.limited(
                "sessions",
                Reply::new(
                    451,
                    "4.7.1",
                    format!("Tenant limit reached: {max} sessions at once, try again later"),
                ),
            )),
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Refuses a new message when the last hour's messages reached `max`.
    pub fn check_messages(&self, max: u64) -> Result<(), Limited> {
        self.check_hour(&self.messages, 0, max, "messages_per_hour", "messages")
    }

    /// Refuses a recipient when the last hour's recipients, with the `pending` ones of the
    /// transaction (counted once it is accepted), reached `max`.
    pub fn check_recipients(&self, max: u64, pending: usize) -> Result<(), Limited> {
        self.check_hour(
            &self.recipients,
            pending as u64,
            max,
            "recipients_per_hour",
            "recipients",
        )
    }

    fn check_hour(
        &self,
        window: &HourWindow,
        pending: u64,
        max: u64,
        limit: &'static str,
        what: &str,
    ) -> Result<(), Limited> {
        if window.count().saturating_add(pending) < max {
            return Ok(());
        }
        Err(self.limited(
            limit,
            Reply::new(
                451,
                "4.7.1",
                format!("Tenant limit reached: {max} {what} per hour, try again later"),
            ),
        ))
    }

    /// Refuses `size` more bytes when the tenant's queue would pass `max`.
    pub fn check_queued(&self, size: u64, max: u64) -> Result<(), Limited> {
        let queued = self.queued_bytes.load(Ordering::Acquire);
        if queued.saturating_add(size) > max {
            return Err(self.limited(
                "queued_bytes",
                Reply::new(
                    452,
                    "4.3.1",
                    format!(
                        "Tenant limit reached: {max} bytes queued ({queued} now), try again later"
                    ),
                ),
            ));
        }
        Ok(())
    }

    /// Counts an accepted message of `recipients` recipients and `size` bytes.
    pub fn accepted(&self, recipients: usize, size: u64) {
        self.messages.add(1);
        self.recipients.add(recipients as u64);
        self.queued_bytes.fetch_add(size, Ordering::AcqRel);
    }

    pub fn set_queued(&self, bytes: u64) {
        self.queued_bytes.store(bytes, Ordering::Release);
    }

    pub fn queued(&self) -> u64 {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Messages accepted in the last hour.
    pub fn messages_last_hour(&self) -> u64 {
        self.messages.count()
    }
}

/// A session slot of a tenant, given back on drop.
pub struct SessionSlot {
    sessions: Arc<AtomicUsize>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts over the last hour, in one-minute buckets (exact to the minute, fixed memory).
struct HourWindow {
    buckets: Mutex<Buckets>,
}

struct Buckets {
    start: Instant,
    /// The minute (since `start`) each bucket holds, and its count.
    minutes: [(u64, u64); 60],
}

impl Default for HourWindow {
    fn default() -> Self {
        HourWindow {
            buckets: Mutex::new(Buckets {
                start: Instant::now(),
                minutes: [(u64::MAX, 0); 60],
            }),
        }
    }
}

const MINUTE: Duration = Duration::from_secs(60);

impl HourWindow {
    fn now_minute(buckets: &Buckets) -> u64 {
        (buckets.start.elapsed().as_secs()) / MINUTE.as_secs()
    }

    fn add(&self, count: u64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let minute = Self::now_minute(&buckets);
        let slot = &mut buckets.minutes[(minute % 60) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += count;
    }

    fn count(&self) -> u64 {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let minute = Self::now_minute(&buckets);
        buckets
            .minutes
            .iter()
            .filter(|(at, _)| *at != u64::MAX && minute.saturating_sub(*at) < 60)
            .map(|(_, count)| count)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_with_a_reply_that_names_them() {
        let usage = Usage::new("acme");
        let first = usage.open_session(1).expect("first");
        let refused = usage.open_session(1).err().expect("second");
        assert_eq!(refused.limit, "sessions");
        assert_eq!(
            refused.reply.to_string(),
            "451 4.7.1 Tenant limit reached: 1 sessions at once, try again later"
        );
        drop(first);
        assert!(usage.open_session(1).is_ok());

        usage.accepted(3, 1000);
        assert!(usage.check_messages(2).is_ok());
        usage.accepted(1, 1000);
        assert_eq!(
            usage.check_messages(2).expect_err("full").limit,
            "messages_per_hour"
        );
        assert!(usage.check_recipients(5, 0).is_ok());
        assert_eq!(
            usage.check_recipients(4, 0).expect_err("full").reply.code,
            451
        );
        // The transaction's own recipients count before it is accepted.
        let pending = usage.check_recipients(6, 2).expect_err("pending");
        assert_eq!(
            pending.reply.to_string(),
            "451 4.7.1 Tenant limit reached: 6 recipients per hour, try again later"
        );
        let queued = usage.check_queued(1, 2000).expect_err("full");
        assert_eq!(
            (queued.reply.code, queued.reply.enhanced.as_str()),
            (452, "4.3.1")
        );
        usage.set_queued(0);
        assert!(usage.check_queued(1, 2000).is_ok());
    }
}
