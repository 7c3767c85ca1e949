//! What the allocator holds: the bytes the balancer's data use now, and the bytes freed but kept
//! for reuse. The resident size (RSS) an operator sees is both, plus the program, its libraries
//! and the threads' stacks; telling the two apart is what tells a leak (bytes in use growing)
//! from an allocator that keeps what bursts of connections freed in pages still partly used
//! (free bytes growing, then staying).

/// The heap at one moment, as glibc's `mallinfo2` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes allocated and not yet freed: the balancer's live data.
    pub in_use: u64,
    /// Bytes freed but held by the allocator (in its free lists, or whole free pages it kept).
    pub free: u64,
    /// Of the bytes in use, those of the spare read buffers the balancer keeps for reuse
    /// (bounded, and filled by the busiest moment so far).
    pub spare_buffers: u64,
}

/// The heap now, where the allocator can say (glibc on Linux), with `spare_buffers` bytes of it
/// kept for reuse; `None` elsewhere.
pub fn heap(spare_buffers: usize) -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own counters, under its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: (info.uordblks + info.hblkhd) as u64,
            free: info.fordblks as u64,
            spare_buffers: spare_buffers as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = spare_buffers;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn bytes_in_use_follow_what_is_allocated() {
        // The counters are the whole process's, and other tests allocate at the same time: what
        // is held here (64 MiB) is far beyond what they move (a slack of 16 MiB).
        const MIB: u64 = 1024 * 1024;
        let before = heap(0).unwrap().in_use;
        let held: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; MIB as usize]).collect();
        let during = heap(0).unwrap().in_use;
        assert!(
            during + 16 * MIB >= before + 64 * MIB,
            "{before} -> {during}"
        );
        drop(held);
        let after = heap(0).unwrap().in_use;
        assert!(after + 48 * MIB <= during, "{during} -> {after}");
    }
}
