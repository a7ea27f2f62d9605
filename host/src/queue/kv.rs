//! The kv port: the per-tenant, per-plugin key-value store plugins reach through the `kv`
//! import. Each queue engine keeps it in its own database, so it is as durable as the queue.
//!
//! Each owner (a tenant's plugin) has a [`Quota`] of keys and bytes. The engines keep what each
//! owner holds in a `kv_usage` table, maintained by triggers in the write's own transaction, and
//! refuse a write that would take the owner past its quota before making it
//! ([`QueueError::OverQuota`]). Expired keys count until [`KvStore::purge_expired`] removes them.

use async_trait::async_trait;

use super::{now_millis, Millis, QueueError};

/// How much one owner may hold: keys, and bytes of keys and values together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub keys: u64,
    pub bytes: u64,
}

impl Default for Quota {
    /// No bound: for the host's own keys and for tools (`check-config`, tests) that set none.
    fn default() -> Quota {
        Quota::UNLIMITED
    }
}

impl Quota {
    /// The host's own keys (the TLS reports' turn) have no quota.
    pub const UNLIMITED: Quota = Quota {
        keys: u64::MAX,
        bytes: u64::MAX,
    };

    /// Whether an owner holding `used` (keys, bytes) may grow by `growth` (keys, bytes); a
    /// write that grows neither is always allowed, so an owner over its quota (after the quota
    /// was lowered) can still shrink and delete. `None` when it may, else what would be exceeded.
    pub fn refuses(&self, used: (i64, i64), growth: (i64, i64)) -> Option<String> {
        let over = |used: i64, growth: i64, limit: u64| {
            growth > 0 && u64::try_from(used.saturating_add(growth)).unwrap_or(0) > limit
        };
        if over(used.0, growth.0, self.keys) {
            return Some(format!("quota of {} keys reached", self.keys));
        }
        if over(used.1, growth.1, self.bytes) {
            return Some(format!("quota of {} bytes reached", self.bytes));
        }
        None
    }
}

/// Every owner's usage, read the same way from either engine's `kv_usage` table.
pub(crate) const USAGE_QUERY: &str =
    "SELECT tenant, plugin, keys, bytes FROM kv_usage ORDER BY tenant, plugin";

/// The rows of [`USAGE_QUERY`].
pub(crate) fn usage_of(rows: Vec<(String, String, i64, i64)>) -> Vec<Usage> {
    rows.into_iter()
        .map(|(tenant, plugin, keys, bytes)| Usage {
            tenant,
            plugin,
            keys,
            bytes,
        })
        .collect()
}

/// What one owner holds, as the usage table counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub tenant: String,
    pub plugin: String,
    pub keys: i64,
    pub bytes: i64,
}

#[async_trait]
pub trait KvStore: Send + Sync {
    async fn get(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, QueueError>;
    async fn set(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u32>,
        quota: Quota,
    ) -> Result<(), QueueError>;
    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
        quota: Quota,
    ) -> Result<i64, QueueError>;
    async fn delete(&self, tenant: &str, plugin: &str, key: &str) -> Result<(), QueueError>;
    /// Writes `value` only if the key's current value is `expected` (`None`: missing or
    /// expired), in one atomic step; returns whether it wrote.
    async fn compare_and_swap(
        &self,
        tenant: &str,
        plugin: &str,
        swap: Swap<'_>,
    ) -> Result<bool, QueueError>;
    /// Deletes at most `limit` keys that expired before `now`; returns how many it deleted.
    /// Callers purge in batches, so no purge holds the write lock for long.
    async fn purge_expired(&self, now: Millis, limit: u32) -> Result<u64, QueueError>;
    /// What every owner holds.
    async fn usage(&self) -> Result<Vec<Usage>, QueueError>;
}

/// One compare-and-swap: the key, the value it must have now, and what to write.
#[derive(Debug, Clone, Copy)]
pub struct Swap<'a> {
    pub key: &'a str,
    pub expected: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub ttl_seconds: Option<u32>,
    pub quota: Quota,
}

/// A kv write as the engines apply it, in their writer's transaction (so kv writes share the
/// queue's group commit); times are fixed when the operation is made.
#[derive(Debug, Clone)]
pub(crate) enum KvWrite {
    Set {
        scope: Scope,
        key: String,
        value: Vec<u8>,
        expires_at: Option<Millis>,
        quota: Quota,
    },
    /// Counters are stored as decimal text; an expired one starts again from `delta`.
    Increment {
        scope: Scope,
        key: String,
        delta: i64,
        now: Millis,
        expires_at: Millis,
        quota: Quota,
    },
    Delete {
        scope: Scope,
        key: String,
    },
    Swap {
        scope: Scope,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        now: Millis,
        expires_at: Option<Millis>,
        quota: Quota,
    },
    /// Deletes at most `limit` keys expired before `now`.
    Purge {
        now: Millis,
        limit: u32,
    },
}

impl KvWrite {
    /// The row it writes: (tenant, plugin, key); none for a purge, which writes many.
    pub(crate) fn key(&self) -> Option<(&str, &str, &str)> {
        let (scope, key) = match self {
            KvWrite::Set { scope, key, .. }
            | KvWrite::Increment { scope, key, .. }
            | KvWrite::Delete { scope, key }
            | KvWrite::Swap { scope, key, .. } => (scope, key),
            KvWrite::Purge { .. } => return None,
        };
        Some((&scope.0, &scope.1, key))
    }
}

/// Whose keys: (tenant, plugin).
pub(crate) type Scope = (String, String);

/// What a [`KvWrite`] gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KvWritten {
    Done,
    Counter(i64),
    Swapped(bool),
    /// Refused before writing: the owner's quota would be exceeded (which, in words).
    OverQuota(String),
    /// Keys a purge deleted.
    Purged(u64),
}

/// An engine's two kv primitives; the [`KvStore`] port is built on them once for all engines.
#[async_trait]
pub(crate) trait KvEngine: Send + Sync {
    /// The value of a key that has not expired at `now`.
    async fn read(
        &self,
        scope: Scope,
        key: &str,
        now: Millis,
    ) -> Result<Option<Vec<u8>>, QueueError>;
    /// Applies one write in the engine's writer and returns its result once committed.
    async fn write(&self, write: KvWrite) -> Result<KvWritten, QueueError>;
    /// What every owner holds.
    async fn read_usage(&self) -> Result<Vec<Usage>, QueueError>;
}

/// The rows a writer reads, inside its transaction, to check a write against its quota.
#[async_trait]
pub(crate) trait KvRows: Send {
    /// The row under `key`, expired or not: its value and expiry.
    async fn row(
        &mut self,
        scope: &Scope,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<Millis>)>, QueueError>;
    /// What the owner holds now: (keys, bytes).
    async fn used(&mut self, scope: &Scope) -> Result<(i64, i64), QueueError>;
}

/// Why `write` may not be made (the quota it would exceed), or `None`: checked by the engine's
/// writer in its transaction, just before the write, so the numbers are the ones it changes.
pub(crate) async fn over_quota(
    rows: &mut (impl KvRows + ?Sized),
    write: &KvWrite,
) -> Result<Option<String>, QueueError> {
    let (scope, key, quota) = match write {
        KvWrite::Set {
            scope, key, quota, ..
        }
        | KvWrite::Increment {
            scope, key, quota, ..
        }
        | KvWrite::Swap {
            scope, key, quota, ..
        } => (scope, key, quota),
        KvWrite::Delete { .. } | KvWrite::Purge { .. } => return Ok(None),
    };
    if *quota == Quota::UNLIMITED {
        return Ok(None);
    }
    let row = rows.row(scope, key).await?;
    // A swap whose precondition does not hold writes nothing: it answers false, not "quota".
    if let KvWrite::Swap { expected, now, .. } = write {
        let live = row
            .as_ref()
            .filter(|(_, expires_at)| expires_at.is_none_or(|at| at > *now))
            .map(|(value, _)| value.as_slice());
        if live != expected.as_deref() {
            return Ok(None);
        }
    }
    let new_len = match write {
        KvWrite::Increment { delta, now, .. } => {
            let live = row
                .as_ref()
                .filter(|(_, expires_at)| expires_at.is_none_or(|at| at > *now))
                .map(|(value, _)| value.as_slice());
            counter_after(live, *delta).len()
        }
        KvWrite::Set { value, .. } | KvWrite::Swap { value, .. } => value.len(),
        KvWrite::Delete { .. } | KvWrite::Purge { .. } => 0,
    };
    let old_len = row
        .as_ref()
        .map(|(value, _)| i64::try_from(value.len()).unwrap_or(i64::MAX));
    let growth = growth(key, old_len, new_len);
    if growth.0 <= 0 && growth.1 <= 0 {
        return Ok(None);
    }
    Ok(quota.refuses(rows.used(scope).await?, growth))
}

/// The growth of an owner's usage (keys, bytes) when `key`, now holding `old` bytes of value
/// (`None`: no row), comes to hold `new` bytes. Expired rows are still rows: they count until
/// purged.
pub(crate) fn growth(key: &str, old: Option<i64>, new: usize) -> (i64, i64) {
    let new = i64::try_from(new).unwrap_or(i64::MAX);
    match old {
        Some(old) => (0, new - old),
        None => (
            1,
            i64::try_from(key.len())
                .unwrap_or(i64::MAX)
                .saturating_add(new),
        ),
    }
}

/// The text a counter holds after an increment by `delta` of `old` (its current text, `None`
/// when missing or expired), as the engines compute it: the length decides the growth.
pub(crate) fn counter_after(old: Option<&[u8]>, delta: i64) -> String {
    let current = old
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .and_then(|text| text.trim().parse::<i64>().ok())
        .unwrap_or(0);
    current.wrapping_add(delta).to_string()
}

fn scope(tenant: &str, plugin: &str) -> Scope {
    (tenant.to_string(), plugin.to_string())
}

fn expiry(now: Millis, ttl_seconds: u32) -> Millis {
    now + i64::from(ttl_seconds) * 1000
}

#[async_trait]
impl<E: KvEngine> KvStore for E {
    async fn get(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        self.read(scope(tenant, plugin), key, now_millis()).await
    }

    async fn set(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u32>,
        quota: Quota,
    ) -> Result<(), QueueError> {
        let write = KvWrite::Set {
            scope: scope(tenant, plugin),
            key: key.to_string(),
            value: value.to_vec(),
            expires_at: ttl_seconds.map(|ttl| expiry(now_millis(), ttl)),
            quota,
        };
        refused(self.write(write).await?).map(|_| ())
    }

    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
        quota: Quota,
    ) -> Result<i64, QueueError> {
        let now = now_millis();
        let write = KvWrite::Increment {
            scope: scope(tenant, plugin),
            key: key.to_string(),
            delta,
            now,
            expires_at: expiry(now, ttl_seconds),
            quota,
        };
        match refused(self.write(write).await?)? {
            KvWritten::Counter(value) => Ok(value),
            other => Err(QueueError::Database(
                format!("an increment answered {other:?}").into(),
            )),
        }
    }

    async fn delete(&self, tenant: &str, plugin: &str, key: &str) -> Result<(), QueueError> {
        let write = KvWrite::Delete {
            scope: scope(tenant, plugin),
            key: key.to_string(),
        };
        self.write(write).await.map(|_| ())
    }

    async fn compare_and_swap(
        &self,
        tenant: &str,
        plugin: &str,
        swap: Swap<'_>,
    ) -> Result<bool, QueueError> {
        let now = now_millis();
        let write = KvWrite::Swap {
            scope: scope(tenant, plugin),
            key: swap.key.to_string(),
            expected: swap.expected.map(<[u8]>::to_vec),
            value: swap.value.to_vec(),
            now,
            expires_at: swap.ttl_seconds.map(|ttl| expiry(now, ttl)),
            quota: swap.quota,
        };
        Ok(refused(self.write(write).await?)? == KvWritten::Swapped(true))
    }

    async fn purge_expired(&self, now: Millis, limit: u32) -> Result<u64, QueueError> {
        match self.write(KvWrite::Purge { now, limit }).await? {
            KvWritten::Purged(count) => Ok(count),
            other => Err(QueueError::Database(
                format!("a purge answered {other:?}").into(),
            )),
        }
    }

    async fn usage(&self) -> Result<Vec<Usage>, QueueError> {
        self.read_usage().await
    }
}

/// A write the engine refused for the quota, as the error the caller sees.
fn refused(written: KvWritten) -> Result<KvWritten, QueueError> {
    match written {
        KvWritten::OverQuota(why) => Err(QueueError::OverQuota(why)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_growth_past_a_limit_is_refused() {
        let quota = Quota { keys: 2, bytes: 10 };
        assert_eq!(quota.refuses((1, 5), (1, 5)), None);
        assert_eq!(
            quota.refuses((2, 5), (1, 1)),
            Some("quota of 2 keys reached".to_string())
        );
        assert_eq!(
            quota.refuses((1, 9), (0, 2)),
            Some("quota of 10 bytes reached".to_string())
        );
        // Over the quota already (it was lowered): shrinking is still allowed.
        assert_eq!(quota.refuses((5, 50), (0, -3)), None);
        assert_eq!(quota.refuses((5, 50), (-1, -10)), None);
        assert_eq!(Quota::UNLIMITED.refuses((i64::MAX, i64::MAX), (1, 1)), None);
    }

    #[test]
    fn growth_counts_a_new_keys_name_and_an_old_keys_change() {
        assert_eq!(growth("abc", None, 4), (1, 7));
        assert_eq!(growth("abc", Some(4), 6), (0, 2));
        assert_eq!(growth("abc", Some(6), 4), (0, -2));
        assert_eq!(counter_after(Some(b"99"), 1), "100");
        assert_eq!(counter_after(None, -3), "-3");
        assert_eq!(counter_after(Some(b"x"), 2), "2");
    }
}
