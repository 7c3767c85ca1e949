//! Recording a request's statistics allocates nothing: the per-second ring, the latency
//! histograms and the counters are all fixed-size atomics. A counting allocator watches this
//! test's thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use lb::stats::BackendStats;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is passed on unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn recording_requests_allocates_nothing() {
    let stats = BackendStats::default();
    // The first reading of the shared clock happens once per process; take it first.
    stats.count_request();
    let before = allocations();
    for i in 0..100_000u64 {
        stats.count_request();
        stats.record(Duration::from_micros(50 + i % 5_000), i % 100 == 0);
        if i % 1000 == 0 {
            stats.record_error();
        }
    }
    assert_eq!(allocations() - before, 0, "allocations while recording");
    assert_eq!(stats.requests(), 100_001);
}
