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
pub mod kv {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::kv as host;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        dispatch!(
            host::get(key),
            crate::testing::mock(|m| m.kv.get(key).cloned())
        )
    }

    pub fn set(key: &str, value: &[u8], ttl_seconds: Option<u32>) {
        dispatch!(
            host::set(key, value, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                m.kv.insert(key.to_string(), value.to_vec());
            })
        )
    }

    /// Adds `delta` to the counter at `key` (0 when missing) and returns the new value.
    pub fn increment(key: &str, delta: i64, ttl_seconds: u32) -> i64 {
        dispatch!(
            host::increment(key, delta, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                let current =
                    m.kv.get(key)
                        .and_then(|bytes| std::str::from_utf8(bytes).ok()?.parse::<i64>().ok())
                        .unwrap_or(0);
                let next = current.saturating_add(delta);
                m.kv.insert(key.to_string(), next.to_string().into_bytes());
                next
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

    /// Sets `key` to `value` if it holds `expected` (`None`: if it is missing).
    pub fn compare_and_swap(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_seconds: Option<u32>,
    ) -> bool {
        dispatch!(
            host::compare_and_swap(key, expected, value, ttl_seconds),
            crate::testing::mock(|m| {
                let _ = ttl_seconds;
                if m.kv.get(key).map(Vec::as_slice) != expected {
                    return false;
                }
                m.kv.insert(key.to_string(), value.to_vec());
                true
            })
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

/// The host's clock.
pub mod clock {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::switchyard::plugin::clock as host;

    /// Milliseconds since the Unix epoch.
    pub fn now_millis() -> u64 {
        dispatch!(host::now_millis(), crate::testing::mock(|m| m.now_millis))
    }
}
