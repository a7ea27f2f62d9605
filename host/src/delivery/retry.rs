//! When to try again, and when to give up.

use crate::config::RetryConfig;
use crate::queue::Millis;

/// The time of the next attempt after `attempts` attempts, or `None` when the message has been
/// queued longer than the maximum lifetime and must be returned.
pub fn next_attempt(
    config: &RetryConfig,
    attempts: i64,
    received_at: Millis,
    now: Millis,
) -> Option<Millis> {
    let lifetime = config.max_lifetime.as_millis() as i64;
    if now - received_at >= lifetime {
        return None;
    }
    let index = (attempts.max(1) as usize - 1).min(config.intervals.len().saturating_sub(1));
    let wait = config
        .intervals
        .get(index)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(300_000);
    Some(now + wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn schedule_and_expiry() {
        let config = RetryConfig {
            intervals: vec![Duration::from_secs(60), Duration::from_secs(600)],
            max_lifetime: Duration::from_secs(3600),
            ..RetryConfig::default()
        };
        assert_eq!(next_attempt(&config, 1, 0, 1000), Some(61_000));
        assert_eq!(next_attempt(&config, 2, 0, 1000), Some(601_000));
        assert_eq!(
            next_attempt(&config, 9, 0, 1000),
            Some(601_000),
            "last interval repeats"
        );
        assert_eq!(next_attempt(&config, 3, 0, 3_600_000), None, "expired");
    }
}
