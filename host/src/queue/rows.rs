//! Rows to queue types, for both engines: their tables have the same columns with types that
//! decode to the same Rust types (integers as i64, text, bytes).

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{Lease, MessageDsn, MessageMeta, RecipientDsn, RecipientRow, RecipientState};
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
