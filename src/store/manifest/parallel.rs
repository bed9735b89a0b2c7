//! Re-reading data on every core: checksumming is cheap (CRC-32 with carry-less multiply),
//! so the cost is the copy out of the page cache, which one core bounds. Two readers of
//! disjoint parts of an image re-read it about twice as fast as one (README, "verify":
//! large `pread`s into a reused buffer measured against `memmap2`, which lost on tmpfs).
//! On a rotating disk, interleaved readers would seek: there one reads.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Less than this much to read is done on the calling thread alone: a thread's start would
/// cost more than it saves.
const SPLIT_BYTES: u64 = 8 << 20;

/// The environment variable that sets the number of readers (1 to 16), overriding the
/// default: the cores, at most 4, and 1 on a rotating disk.
pub const READERS_ENV: &str = "QMPBACKUP_READERS";

/// Whether `path` lies on a rotating disk, as sysfs says (false when it cannot tell).
fn on_rotating_disk(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition's queue is its disk's.
    [
        format!("{base}/queue/rotational"),
        format!("{base}/../queue/rotational"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .is_some_and(|v| v.trim() == "1")
}

/// Whether [`in_parts`] splits this much reading between threads (given more than one).
pub fn worth_splitting(bytes: u64) -> bool {
    bytes >= SPLIT_BYTES
}

/// How many threads re-read the file at `path`.
pub fn readers(path: &Path) -> usize {
    if let Some(n) = std::env::var(READERS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.clamp(1, 16);
    }
    if on_rotating_disk(path) {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Splits `items` (in order) into at most `states.len()` contiguous parts of about equal
/// `weight` and runs `work` on each part with its own state, the parts on their own
/// threads. The results come back in the parts' order, so the first error by position is
/// the first in the returned vector, whichever thread found it. Once a part fails, the
/// parts after it are told to stop (`work`'s third argument returns true): their results
/// would come after the error anyway. No states: no work, no results.
pub fn in_parts<T: Sync, S: Send, X: Send>(
    states: &mut [S],
    items: &[T],
    weight: impl Fn(&T) -> u64,
    work: impl Fn(&mut S, &[T], &dyn Fn() -> bool) -> anyhow::Result<X> + Sync,
) -> Vec<anyhow::Result<X>> {
    if states.is_empty() {
        return Vec::new();
    }
    let total: u64 = items.iter().map(&weight).sum();
    if states.len() == 1 || !worth_splitting(total) {
        return vec![work(&mut states[0], items, &|| false)];
    }
    let share = total.div_ceil(states.len() as u64);
    let mut parts: Vec<&[T]> = Vec::with_capacity(states.len());
    let (mut from, mut bytes) = (0usize, 0u64);
    for (i, item) in items.iter().enumerate() {
        bytes += weight(item);
        if bytes >= share && parts.len() + 1 < states.len() {
            parts.push(&items[from..=i]);
            (from, bytes) = (i + 1, 0);
        }
    }
    parts.push(&items[from..]);
    let first_failed = AtomicUsize::new(usize::MAX);
    let (work, first_failed) = (&work, &first_failed);
    std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .iter_mut()
            .zip(parts)
            .enumerate()
            .map(|(i, (state, part))| {
                scope.spawn(move || {
                    let stop = || first_failed.load(Ordering::Relaxed) < i;
                    let result = work(state, part, &stop);
                    if result.is_err() {
                        first_failed.fetch_min(i, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::in_parts;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn parts_cover_the_items_in_order_whatever_the_split() {
        let items: Vec<u64> = (0..1000).map(|i| (i % 7 + 1) << 20).collect();
        for workers in 1..=4 {
            let mut states = vec![0usize; workers];
            let parts = in_parts(
                &mut states,
                &items,
                |&w| w,
                |seen, part, _| {
                    *seen += part.len();
                    Ok(part.to_vec())
                },
            );
            assert!(parts.len() <= workers);
            let joined: Vec<u64> = parts.into_iter().flat_map(|p| p.unwrap()).collect();
            assert_eq!(joined, items);
            assert_eq!(states.iter().sum::<usize>(), items.len());
        }
        // Little to read: one part, on the calling thread.
        let mut states = vec![0usize; 4];
        let parts = in_parts(&mut states, &[1u64, 2, 3], |&w| w, |_, p, _| Ok(p.len()));
        assert_eq!(parts.len(), 1);
        // Nothing at all; no states.
        let parts = in_parts(&mut states, &[] as &[u64], |&w| w, |_, p, _| Ok(p.len()));
        assert_eq!(parts.len(), 1);
        let parts = in_parts(
            &mut [] as &mut [usize],
            &[1u64],
            |&w| w,
            |_, p, _| Ok(p.len()),
        );
        assert!(parts.is_empty());
    }

    #[test]
    fn parts_after_a_failed_one_stop_and_the_first_error_wins() {
        let items: Vec<u64> = vec![1 << 20; 64];
        let done_after_failure = AtomicUsize::new(0);
        let mut states: Vec<usize> = (0..4).collect();
        let results = in_parts(
            &mut states,
            &items,
            |&w| w,
            |i, part, stop| {
                if *i == 1 {
                    anyhow::bail!("part 1 failed");
                }
                for _ in part {
                    if stop() {
                        return Ok(0);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    if *i > 1 {
                        done_after_failure.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(part.len())
            },
        );
        let first_error = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(first_error.to_string(), "part 1 failed");
        // Part 0 ran to its end; parts 2 and 3 stopped early (16 items each otherwise).
        assert_eq!(*results[0].as_ref().unwrap(), 16);
        assert!(done_after_failure.load(Ordering::Relaxed) < 32);
    }
}
