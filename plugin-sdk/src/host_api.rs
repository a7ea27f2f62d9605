//! Host functions. Each module needs the matching grant in the plugin's manifest
//! (`grants = ["log", "kv", ...]`), except `bag`, which every plugin has. In a plugin they call
//! the host; built natively (`cargo test`), they call the test harness's mock host
//! ([`crate::testing`]), so a plugin's tests need no WebAssembly runtime.

/// Calls the host in a plugin, the mock host natively.
macro_rules! dispatch {
    ($host:expr, $mock:expr) => {{
        #[cfg(target_arch = "wasm32")]
        {
            $host
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            $mock
        }
    }};
}

/// The plugin's bag for the transaction: strings kept from one hook call to the next.
pub mod bag {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::bag as host;

    pub fn get(key: &str) -> Option<String> {
        dispatch!(
            host::get(key),
            crate::testing::mock(|m| m.bag.get(key).cloned())
        )
    }

    pub fn set(key: &str, value: &str) {
        dispatch!(
            host::set(key, value),
            crate::testing::mock(|m| {
                m.bag.insert(key.to_string(), value.to_string());
            })
        )
    }
}

/// Log lines, with the plugin's name, in the host's log.
pub mod log {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::log as host;
    pub use crate::Level;

    pub fn write(level: Level, message: &str) {
        dispatch!(
            host::write(level, message),
            crate::testing::mock(|m| m.logs.push((level, message.to_string())))
        )
    }
}

/// The plugin's own metrics, exported by the host.
pub mod metrics {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::metrics as host;

    pub fn counter_add(name: &str, value: u64) {
        dispatch!(
            host::counter_add(name, value),
            crate::testing::mock(|m| *m.counters.entry(name.to_string()).or_default() += value)
        )
    }

    pub fn histogram_record(name: &str, value: f64) {
        dispatch!(
            host::histogram_record(name, value),
            crate::testing::mock(|m| m.histograms.push((name.to_string(), value)))
        )
    }
}

/// The key-value store, shared by the plugin's instances (and by the nodes of a shared queue).
/// Keys are at most [`MAX_KEY_BYTES`], values at most [`MAX_VALUE_BYTES`], and the operator
/// gives each plugin a quota of keys and bytes: the `try_` functions say why a write was
/// refused.
pub mod kv {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::kv as host;

    pub use crate::bindings::switchyard::plugin::kv::KvError;

    /// The longest key the host takes, in bytes.
    pub const MAX_KEY_BYTES: usize = 1024;
    /// The largest value the host takes, in bytes.
    pub const MAX_VALUE_BYTES: usize = 65536;

    /// What the mock host refuses, as the real one would.
    #[cfg(not(target_arch = "wasm32"))]
    fn mock_refusal(m: &crate::testing::MockHost, key: &str, value: &[u8]) -> Result<(), KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::KeyTooLong(MAX_KEY_BYTES as u32));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(KvError::ValueTooLarge(MAX_VALUE_BYTES as u32));
        }
        match &m.kv_refuses {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    pub fn get(key: &str) -> Option<Vec<u8>> {
        dispatch!(
            host::get(key),
            crate::testing::mock(|m| m.kv.get(key).cloned())
        )
    }

    /// Stores a value; a refused write (see [`try_set`]) is logged by the host and ignored.
    pub fn set(key: &str, value: &[u8], ttl_seconds: Option<u32>) {
        dispatch!(host::set(key, value, ttl_seconds), {
            let _ = try_set(key, value, ttl_seconds);
        })
    }

    /// Adds `delta` to the counter at `key` (0 when missing) and returns the new value. When
    /// the count cannot be made the plugin traps (its failure policy answers): see
    /// [`try_increment`] to decide for itself.
    pub fn increment(key: &str, delta: i64, ttl_seconds: u32) -> i64 {
        dispatch!(
            host::increment(key, delta, ttl_seconds),
            match try_increment(key, delta, ttl_seconds) {
                Ok(next) => next,
                Err(error) => panic!("kv increment refused: {error:?}"),
            }
        )
    }

    /// `set`, saying why when the write is refused.
    pub fn try_set(key: &str, value: &[u8], ttl_seconds: Option<u32>) -> Result<(), KvError> {
        dispatch!(
            host::try_set(key, value, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                mock_refusal(m, key, value)?;
                m.kv.insert(key.to_string(), value.to_vec());
                Ok(())
            })
        )
    }

    /// `increment`, with an error instead of a trap.
    pub fn try_increment(key: &str, delta: i64, ttl_seconds: u32) -> Result<i64, KvError> {
        dispatch!(
            host::try_increment(key, delta, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                mock_refusal(m, key, b"")?;
                let current =
                    m.kv.get(key)
                        .and_then(|bytes| std::str::from_utf8(bytes).ok()?.parse::<i64>().ok())
                        .unwrap_or(0);
                let next = current.saturating_add(delta);
                m.kv.insert(key.to_string(), next.to_string().into_bytes());
                Ok(next)
            })
        )
    }

    /// `compare_and_swap`, with an error instead of `false` when the write is refused.
    pub fn try_compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> Result<bool, KvError> {
        dispatch!(
            host::try_compare_and_swap(key, expected, value, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                mock_refusal(m, key, value)?;
                if m.kv.get(key).map(Vec::as_slice) != expected {
                    return Ok(false);
                }
                m.kv.insert(key.to_string(), value.to_vec());
                Ok(true)
            })
        )
    }

    pub fn delete(key: &str) {
        dispatch!(
            host::delete(key),
            crate::testing::mock(|m| {
                m.kv.remove(key);
            })
        )
    }

    /// Sets `key` to `value` if it holds `expected` (`None`: if it is missing); `false` too
    /// when the write is refused.
    pub fn compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> bool {
        dispatch!(
            host::compare_and_swap(key, expected, value, ttl_seconds),
            try_compare_and_swap(key, expected, value, ttl_seconds).unwrap_or(false)
        )
    }
}

/// DNS lookups through the host's resolver.
pub mod dns {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::dns as host;

    pub fn txt(name: &str) -> Result<Vec<String>, String> {
        dispatch!(
            host::txt(name),
            crate::testing::mock(|m| m.lookup("txt", name))
        )
    }

    pub fn ip(name: &str) -> Result<Vec<String>, String> {
        dispatch!(
            host::ip(name),
            crate::testing::mock(|m| m.lookup("ip", name))
        )
    }
}

/// What the host's content scanners (rspamd, ClamAV) said about the message the data hook is
/// deciding on (needs the `scanners` grant; WIT 0.2.3).
pub mod scanners {
    pub use crate::bindings::switchyard::plugin::scanners::{
        ClamavReport, RspamdReport, ScanError, ScanOutcome, ScanResult, Symbol,
    };

    /// Every applicable scanner's result, in the host's configured order; empty when no scanner
    /// applies to the message. In a test: the mock host's `scans`.
    pub fn results(message: &crate::Body<'_>) -> Vec<ScanResult> {
        #[cfg(target_arch = "wasm32")]
        {
            match message.host_body() {
                Some(body) => crate::bindings::switchyard::plugin::scanners::results(body),
                None => Vec::new(),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = message;
            crate::testing::mock(|m| m.scans.clone())
        }
    }
}

/// The host's clock.
pub mod clock {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::clock as host;

    /// Milliseconds since the Unix epoch.
    pub fn now_millis() -> u64 {
        dispatch!(host::now_millis(), crate::testing::mock(|m| m.now_millis))
    }
}
