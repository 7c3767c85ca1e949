//! A fine latency histogram for the statistics page's percentiles.
//!
//! The Prometheus histogram of [`crate::stats::LATENCY_BUCKETS`] has 15 wide buckets, right for
//! `/metrics` (a monitoring system sums them across instances) but too coarse to read a
//! percentile from: its p99 is a bucket's upper bound, so a backend answering in 0.1 ms shows
//! 0.5 ms. This one is log-linear, as HdrHistogram is: each power of two of nanoseconds is cut
//! into [`SUB_BUCKETS`] equal buckets, so a bucket is at most 1/16 of its lower bound wide, and
//! its midpoint is within 1/32 (3.2 %) of any value in it. From 1 ns to 2^38 ns (about 4.6
//! minutes) that is 560 atomic counters per backend: constant memory, and recording is one
//! atomic addition, with no lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Buckets per power of two.
pub const SUB_BUCKETS: u64 = 16;

/// `log2(SUB_BUCKETS)`.
const SUB_BITS: u32 = 4;

/// The largest power of two of nanoseconds with buckets of its own; longer latencies share the
/// last bucket.
const MAX_EXPONENT: u32 = 37;

/// Buckets in all: 16 one nanosecond wide, then 16 per power of two from 2^4 to 2^37 ns.
pub const BUCKETS: usize = (SUB_BUCKETS as usize) * (MAX_EXPONENT - SUB_BITS + 2) as usize;

/// Counts of latencies in log-linear buckets.
#[derive(Debug)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(nanos)].fetch_add(1, Relaxed);
    }

    /// The `percentile` (0–100) in milliseconds: the midpoint of the bucket in which that share
    /// of the recorded latencies is reached; 0 when nothing was recorded.
    pub fn percentile_ms(&self, percentile: f64) -> f64 {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let wanted = (total as f64 * percentile / 100.0)
            .ceil()
            .clamp(1.0, total as f64) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                let (low, width) = bounds(bucket);
                return (low as f64 + width as f64 / 2.0) / 1e6;
            }
        }
        0.0
    }
}

/// The bucket of a latency of `nanos` nanoseconds.
fn bucket_of(nanos: u64) -> usize {
    if nanos < SUB_BUCKETS {
        return nanos as usize;
    }
    let exponent = 63 - nanos.leading_zeros();
    if exponent > MAX_EXPONENT {
        return BUCKETS - 1;
    }
    let sub = (nanos >> (exponent - SUB_BITS)) & (SUB_BUCKETS - 1);
    (SUB_BUCKETS as usize) * (exponent - SUB_BITS + 1) as usize + sub as usize
}

/// The lower bound and width of `bucket`, in nanoseconds.
fn bounds(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < SUB_BUCKETS {
        return (bucket, 1);
    }
    let exponent = (bucket / SUB_BUCKETS) as u32 + SUB_BITS - 1;
    let sub = bucket % SUB_BUCKETS;
    let width = 1u64 << (exponent - SUB_BITS);
    ((SUB_BUCKETS + sub) * width, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The percentile as the page defines it, from every value sorted.
    fn exact(sorted: &[u64], percentile: f64) -> f64 {
        let rank = (sorted.len() as f64 * percentile / 100.0).ceil().max(1.0) as usize;
        sorted[rank - 1] as f64 / 1e6
    }

    /// A small deterministic generator (xorshift), so the distributions are the same each run.
    fn uniform(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    fn check(name: &str, mut nanos: Vec<u64>) {
        let histogram = LatencyHistogram::default();
        for &n in &nanos {
            histogram.record(Duration::from_nanos(n));
        }
        nanos.sort_unstable();
        for p in [50.0, 90.0, 99.0, 99.9] {
            let (estimate, truth) = (histogram.percentile_ms(p), exact(&nanos, p));
            let error = (estimate - truth).abs() / truth;
            assert!(error <= 0.05, "{name} p{p}: {estimate} ms for {truth} ms");
        }
    }

    #[test]
    fn buckets_cover_the_range_in_order() {
        let mut last = 0;
        for nanos in (0..40)
            .map(|e| 1u64 << e)
            .flat_map(|p| [p, p + p / 3, p * 2 - 1])
        {
            let bucket = bucket_of(nanos);
            assert!(bucket >= last, "{nanos}");
            last = bucket;
            let (low, width) = bounds(bucket);
            if bucket < BUCKETS - 1 {
                assert!(
                    low <= nanos && nanos < low + width,
                    "{nanos} in {low}+{width}"
                );
                assert!(
                    width * 16 <= low.max(16),
                    "{nanos}: width {width} over 1/16"
                );
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of((1 << 38) - 1), BUCKETS - 1);
        assert_eq!(BUCKETS, 560);
    }

    #[test]
    fn percentiles_are_within_5_percent_on_known_distributions() {
        // The two examples: a backend answering in 0.1 ms, another in 1 ms.
        check("constant 0.1 ms", vec![100_000; 1000]);
        check("constant 1 ms", vec![1_000_000; 1000]);
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let uniform_ms: Vec<u64> = (0..100_000)
            .map(|_| 1_000_000 + (uniform(&mut state) * 9_000_000.0) as u64)
            .collect();
        check("uniform 1-10 ms", uniform_ms);
        // Exponential with a 2 ms mean: a long tail.
        let exponential: Vec<u64> = (0..100_000)
            .map(|_| (-(1.0 - uniform(&mut state)).ln() * 2e6) as u64 + 50_000)
            .collect();
        check("exponential, mean 2 ms", exponential);
        // Mostly fast, 2 % slow: p99 lands among the slow ones.
        let bimodal: Vec<u64> = (0..50_000)
            .map(|i| {
                if i % 50 == 0 {
                    250_000_000
                } else {
                    120_000 + i % 7_000
                }
            })
            .collect();
        check("bimodal 0.12 ms / 250 ms", bimodal);
        // Log-uniform over six decades, 1 µs to 1 s.
        let spread: Vec<u64> = (0..100_000)
            .map(|_| 10f64.powf(3.0 + 6.0 * uniform(&mut state)) as u64)
            .collect();
        check("log-uniform 1 µs - 1 s", spread);
    }

    #[test]
    fn nothing_recorded_reads_as_zero() {
        assert_eq!(LatencyHistogram::default().percentile_ms(99.0), 0.0);
    }
}
