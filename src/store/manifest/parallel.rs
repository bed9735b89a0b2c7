//! Re-reading data on every core: checksumming is cheap (CRC-32 with carry-less multiply),
//! so the cost is the copy out of the page cache, which one core bounds. Two readers of
//! disjoint parts of an image re-read it about twice as fast as one (README, "verify":
//! large `pread`s into a reused buffer measured against `memmap2`, which lost on tmpfs).

/// Less than this much to read is done on the calling thread alone: a thread's start would
/// cost more than it saves.
const SPLIT_BYTES: u64 = 8 << 20;

/// How many threads re-read data.
pub fn readers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Splits `items` (in order) into at most `states.len()` contiguous parts of about equal
/// `weight` and runs `work` on each part with its own state, the parts on their own
/// threads. The results come back in the parts' order, so the first error by position is
/// the first in the returned vector, whichever thread found it.
pub fn in_parts<T: Sync, S: Send, R: Send>(
    states: &mut [S],
    items: &[T],
    weight: impl Fn(&T) -> u64,
    work: impl Fn(&mut S, &[T]) -> R + Sync,
) -> Vec<R> {
    let total: u64 = items.iter().map(&weight).sum();
    if states.len() <= 1 || total < SPLIT_BYTES {
        return vec![work(&mut states[0], items)];
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
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .iter_mut()
            .zip(parts)
            .map(|(state, part)| scope.spawn(move || work(state, part)))
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

    #[test]
    fn parts_cover_the_items_in_order_whatever_the_split() {
        let items: Vec<u64> = (0..1000).map(|i| (i % 7 + 1) << 20).collect();
        for workers in 1..=4 {
            let mut states = vec![0usize; workers];
            let parts = in_parts(
                &mut states,
                &items,
                |&w| w,
                |seen, part| {
                    *seen += part.len();
                    part.to_vec()
                },
            );
            assert!(parts.len() <= workers);
            assert_eq!(parts.concat(), items);
            assert_eq!(states.iter().sum::<usize>(), items.len());
        }
        // Little to read: one part, on the calling thread.
        let mut states = vec![0usize; 4];
        let parts = in_parts(&mut states, &[1u64, 2, 3], |&w| w, |_, p| p.len());
        assert_eq!(parts, [3]);
        // Nothing at all.
        let parts = in_parts(&mut states, &[] as &[u64], |&w| w, |_, p| p.len());
        assert_eq!(parts, [0]);
    }
}
