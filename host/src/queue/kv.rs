//! The kv port: the per-tenant, per-plugin key-value store plugins reach through the `kv`
//! import. Each queue engine keeps it in its own database, so it is as durable as the queue.

use async_trait::async_trait;

use super::{now_millis, Millis, QueueError};

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
    ) -> Result<(), QueueError>;
    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
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
}

/// One compare-and-swap: the key, the value it must have now, and what to write.
#[derive(Debug, Clone, Copy)]
pub struct Swap<'a> {
    pub key: &'a str,
    pub expected: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub ttl_seconds: Option<u32>,
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
    },
    /// Counters are stored as decimal text; an expired one starts again from `delta`.
    Increment {
        scope: Scope,
        key: String,
        delta: i64,
        now: Millis,
        expires_at: Millis,
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
    },
}

impl KvWrite {
    /// The row it writes: (tenant, plugin, key).
    pub(crate) fn key(&self) -> (&str, &str, &str) {
        let (scope, key) = match self {
            KvWrite::Set { scope, key, .. }
            | KvWrite::Increment { scope, key, .. }
            | KvWrite::Delete { scope, key }
            | KvWrite::Swap { scope, key, .. } => (scope, key),
        };
        (&scope.0, &scope.1, key)
    }
}

/// Whose keys: (tenant, plugin).
pub(crate) type Scope = (String, String);

/// What a [`KvWrite`] gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvWritten {
    Done,
    Counter(i64),
    Swapped(bool),
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
    ) -> Result<(), QueueError> {
        let write = KvWrite::Set {
            scope: scope(tenant, plugin),
            key: key.to_string(),
            value: value.to_vec(),
            expires_at: ttl_seconds.map(|ttl| expiry(now_millis(), ttl)),
        };
        self.write(write).await.map(|_| ())
    }

    async fn increment(
        &self,
        tenant: &str,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_seconds: u32,
    ) -> Result<i64, QueueError> {
        let now = now_millis();
        let write = KvWrite::Increment {
            scope: scope(tenant, plugin),
            key: key.to_string(),
            delta,
            now,
            expires_at: expiry(now, ttl_seconds),
        };
        match self.write(write).await? {
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
        };
        Ok(self.write(write).await? == KvWritten::Swapped(true))
    }
}
