//! The memory budget of one plugin instance: its `memory_limit` caps all of its linear memories
//! together, not each one (a component may hold several core modules, each with a memory). A
//! run's store holds every plugin's instance; growth is charged to the plugin being called or
//! instantiated, so each plugin keeps its own budget.

use wasmtime::ResourceLimiter;

use super::host::HostState;

/// Core instances, tables and memories one component instance may create: far above what a
/// plugin built by wit-bindgen or componentize-py needs, and a bound on the bookkeeping a
/// hostile component can ask for.
const MAX_INSTANCES: usize = 16;
const MAX_TABLES: usize = 16;
const MAX_MEMORIES: usize = 4;
/// Table elements (function references): generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

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

/// The store's limiter: each plugin's own budget, and counts that scale with the chain.
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.plugin_mut().limits.grow(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("memory growth failed"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|maximum| desired <= maximum))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES * self.plugins.len()
    }

    fn tables(&self) -> usize {
        MAX_TABLES * self.plugins.len()
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES * self.plugins.len()
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
