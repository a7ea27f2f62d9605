//! The memory budget of one plugin instance: its `memory_limit` caps all of its linear memories
//! together, not each one (a component may hold several core modules, each with a memory). A
//! run's store holds every plugin's instance; growth is charged to the plugin being called or
//! instantiated (the store's limiter in `host/mod.rs`), so each plugin keeps its own budget.

pub struct MemoryBudget {
    limit: usize,
    /// Bytes held by every linear memory of the instance.
    used: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget { limit, used: 0 }
    }

    /// Whether the plugin's memories may grow from `current` to `desired` bytes (one of them;
    /// `current` is 0 when a memory is created); an error (a trap) past the budget.
    pub fn grow(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Also called with `current` 0 when a memory is created, so `used` counts every memory.
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            // A trap, not a failed `memory.grow`: the plugin is stopped and its failure policy
            // applies, rather than leaving a guest to handle (or ignore) an allocation failure.
            return Err(wasmtime::format_err!(
                "memory limit exceeded: growing a linear memory to {desired} bytes would take \
                 the plugin to {total} bytes, over its memory_limit of {} bytes",
                self.limit
            ));
        }
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 64 * 1024;

    #[test]
    fn the_limit_covers_all_memories_together() {
        let mut budget = MemoryBudget::new(4 * PAGE);
        // Two memories created with two pages each: exactly the limit.
        assert!(budget.grow(0, 2 * PAGE, None).expect("first"));
        assert!(budget.grow(0, 2 * PAGE, None).expect("second"));
        // Either growing by one more page goes over it, though each alone is under the limit.
        let error = budget
            .grow(2 * PAGE, 3 * PAGE, None)
            .expect_err("over the shared limit");
        assert!(
            error.to_string().contains("memory limit exceeded"),
            "{error}"
        );
    }

    #[test]
    fn a_memory_may_not_grow_past_its_own_maximum() {
        let mut budget = MemoryBudget::new(16 * PAGE);
        assert!(!budget
            .grow(PAGE, 3 * PAGE, Some(2 * PAGE))
            .expect("refused"));
        assert!(budget.grow(0, 2 * PAGE, Some(2 * PAGE)).expect("allowed"));
    }
}
