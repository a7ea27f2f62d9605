//! Idle connections: a worker that runs out of jobs for a destination parks its connection for
//! the rule's `idle_timeout` (up to `idle_connections` of them, and never more than the rule's
//! `connections` with the busy ones) instead of closing it; the destination's next worker takes
//! it, once it still answers, instead of opening a new one. A connection left idle past its time
//! is closed with QUIT, as are those still idle when the server stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::connect::Connection;
use crate::shutdown::Shutdown;

struct Parked {
    id: u64,
    connection: Box<dyn Connection>,
}

/// The idle connections of every destination.
#[derive(Default)]
pub struct IdlePool {
    parked: Mutex<HashMap<String, Vec<Parked>>>,
    next_id: AtomicU64,
}

impl IdlePool {
    fn parked(&self) -> MutexGuard<'_, HashMap<String, Vec<Parked>>> {
        self.parked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Idle connections to `key` now.
    pub fn count(&self, key: &str) -> usize {
        self.parked().get(key).map(Vec::len).unwrap_or_default()
    }

    /// The destinations with idle connections.
    pub fn keys(&self) -> Vec<String> {
        self.parked().keys().cloned().collect()
    }

    /// Parks `connection` for `timeout` when fewer than `room` connections to `key` are idle;
    /// otherwise gives it back (the caller closes it).
    pub fn park(
        self: &Arc<Self>,
        key: &str,
        connection: Box<dyn Connection>,
        timeout: Duration,
        room: usize,
        shutdown: &Shutdown,
    ) -> Option<Box<dyn Connection>> {
        if timeout.is_zero() || room == 0 || shutdown.is_stopping() {
            return Some(connection);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut parked = self.parked();
            let idle = parked.entry(key.to_string()).or_default();
            if idle.len() >= room {
                return Some(connection);
            }
            idle.push(Parked { id, connection });
        }
        let pool = self.clone();
        let key = key.to_string();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = stop.stopping() => {}
            }
            if let Some(connection) = pool.remove(&key, id) {
                connection.close().await;
            }
        });
        None
    }

    /// The most recently parked idle connection to `key`, if one is.
    pub fn take(&self, key: &str) -> Option<Box<dyn Connection>> {
        let mut parked = self.parked();
        let idle = parked.get_mut(key)?;
        let taken = idle.pop().map(|parked| parked.connection);
        if idle.is_empty() {
            parked.remove(key);
        }
        taken
    }

    fn remove(&self, key: &str, id: u64) -> Option<Box<dyn Connection>> {
        let mut parked = self.parked();
        let idle = parked.get_mut(key)?;
        let position = idle.iter().position(|parked| parked.id == id)?;
        let removed = idle.swap_remove(position).connection;
        if idle.is_empty() {
            parked.remove(key);
        }
        Some(removed)
    }
}
