//! Rows to queue types, for both engines: their tables have the same columns with types that
//! decode to the same Rust types (integers as i64, text, bytes).

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::policies::{CountedOutcome, StoredPolicy, TlsOutcome};
use super::traces::{record_of_row, TraceRecord};
use super::{
    Lease, MessageDsn, MessageMeta, QueueStats, RecipientDsn, RecipientRow, RecipientState,
};
use crate::mail::dsn_params::{Notify, Ret};

/// The message columns every query of messages reads.
pub(crate) const MESSAGE_COLUMNS: &str =
    "id, sender, received_at, size, smtputf8, eight_bit, tenant, dsn_ret, dsn_envid, requiretls";

/// The recipient columns every query of recipients reads.
pub(crate) const RECIPIENT_COLUMNS: &str =
    "idx, address, state, attempts, next_attempt, last_reply, \
     notify, orcpt, delay_warned, lease_owner, lease_until";

/// A row of either engine whose columns decode to the queue's types.
pub(crate) trait QueueRow {
    fn int(&self, column: &str) -> i64;
    fn text(&self, column: &str) -> String;
    fn optional_text(&self, column: &str) -> Option<String>;
    fn optional_int(&self, column: &str) -> Option<i64>;
}

impl<R> QueueRow for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    fn int(&self, column: &str) -> i64 {
        self.try_get(column).unwrap_or_default()
    }
    fn text(&self, column: &str) -> String {
        self.try_get(column).unwrap_or_default()
    }
    fn optional_text(&self, column: &str) -> Option<String> {
        self.try_get(column).ok().flatten()
    }
    fn optional_int(&self, column: &str) -> Option<i64> {
        self.try_get(column).ok().flatten()
    }
}

pub(crate) fn recipient_from_row(row: &impl QueueRow) -> RecipientRow {
    let lease = match (
        row.optional_text("lease_owner"),
        row.optional_int("lease_until"),
    ) {
        (Some(owner), Some(until)) => Some(Lease { owner, until }),
        _ => None,
    };
    RecipientRow {
        index: row.int("idx"),
        address: row.text("address"),
        state: RecipientState::from_i64(row.int("state")),
        attempts: row.int("attempts"),
        next_attempt: row.int("next_attempt"),
        last_reply: row.optional_text("last_reply"),
        dsn: RecipientDsn {
            notify: Notify::from_bits(row.int("notify")),
            orcpt: row.optional_text("orcpt"),
        },
        delay_warned: row.int("delay_warned") != 0,
        lease,
    }
}

pub(crate) fn meta_from_row(row: &impl QueueRow) -> MessageMeta {
    MessageMeta {
        id: row.text("id"),
        sender: row.text("sender"),
        received_at: row.int("received_at"),
        size: row.int("size").max(0) as u64,
        smtputf8: row.int("smtputf8") != 0,
        eight_bit: row.int("eight_bit") != 0,
        tenant: row.text("tenant"),
        dsn: MessageDsn {
            ret: row
                .optional_text("dsn_ret")
                .and_then(|ret| Ret::parse(&ret).ok()),
            envid: row.optional_text("dsn_envid"),
            requiretls: row.int("requiretls") != 0,
        },
    }
}

/// Every TLS outcome counted so far: the same query on both engines.
pub(crate) const SELECT_TLS_OUTCOMES: &str =
    "SELECT domain, policy_type, policy_text, mx_host, result, receiving_ip, reason,
            count, first_at, last_at
     FROM tls_outcomes ORDER BY domain, result";

pub(crate) fn counted_outcome_from_row(row: &impl QueueRow) -> CountedOutcome {
    CountedOutcome {
        outcome: TlsOutcome {
            domain: row.text("domain"),
            policy_type: row.text("policy_type"),
            policy_text: row.text("policy_text"),
            mx_host: row.text("mx_host"),
            result: row.text("result"),
            receiving_ip: row.text("receiving_ip"),
            reason: row.text("reason"),
        },
        count: row.int("count"),
        first_at: row.int("first_at"),
        last_at: row.int("last_at"),
    }
}

/// A row of `id, policy, fetched_at, expires_at` from `sts_policies`.
pub(crate) fn stored_policy_from_row(row: &impl QueueRow) -> StoredPolicy {
    StoredPolicy {
        id: row.text("id"),
        text: row.text("policy"),
        fetched_at: row.int("fetched_at"),
        expires_at: row.int("expires_at"),
    }
}

/// The trace columns every query of traces reads.
pub(crate) const TRACE_COLUMNS: &str = "message_id, at, phase, client_ip, sender, body";

pub(crate) fn trace_from_row(row: &impl QueueRow) -> TraceRecord {
    record_of_row(
        row.optional_text("message_id"),
        row.int("at"),
        row.text("phase"),
        row.text("client_ip"),
        row.text("sender"),
        &row.text("body"),
    )
}

/// The queue's counts as both engines' stats queries return them, in this order.
pub(crate) type StatsRow = (i64, i64, i64, i64, i64, i64);

pub(crate) fn stats_from_row(row: StatsRow) -> QueueStats {
    let (messages, queued, quarantined, leased, leased_here, held) = row;
    QueueStats {
        messages,
        queued,
        quarantined,
        held,
        leased,
        leased_here,
    }
}
