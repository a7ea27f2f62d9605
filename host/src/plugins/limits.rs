//! The memory budget of one plugin instance: its `memory_limit` caps all of its linear memories
//! together, not each one (a component may hold several core modules, each with a memory).

use wasmtime::ResourceLimiter;

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
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(
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
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
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
        assert!(budget.memory_growing(0, 2 * PAGE, None).expect("first"));
        assert!(budget.memory_growing(0, 2 * PAGE, None).expect("second"));
        // Either growing by one more page goes over it, though each alone is under the limit.
        let error = budget
            .memory_growing(2 * PAGE, 3 * PAGE, None)
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
            .memory_growing(PAGE, 3 * PAGE, Some(2 * PAGE))
            .expect("refused"));
        assert!(budget
            .memory_growing(0, 2 * PAGE, Some(2 * PAGE))
            .expect("allowed"));
    }
}
