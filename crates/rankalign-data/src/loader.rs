//! Which items each step trains on, and a prefetcher that builds batches ahead.
//!
//! [`BatchPlan`] maps a step to dataset indices: epoch `e = step / steps_per_epoch`
//! shuffles all indices with a generator seeded by `(seed, e)` and the step takes its
//! slice (the remainder of an epoch is dropped, as `drop_last`). The data position of a
//! run is therefore just its step, and resuming at step `t` replays exactly the batches
//! of an uninterrupted run.
//!
//! [`Prefetcher`] runs the batch builder for the coming steps on its own thread and
//! rayon pool, `depth` batches ahead, so the training step does not wait on decoding.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::{DataError, mix_seed};

/// The order in which a training run visits its dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    pub seed: u64,
    pub dataset_len: usize,
    pub batch_size: usize,
}

impl BatchPlan {
    pub fn new(seed: u64, dataset_len: usize, batch_size: usize) -> Result<Self, DataError> {
        if batch_size == 0 || batch_size > dataset_len {
            return Err(DataError::Invalid(format!(
                "batch size {batch_size} must be between 1 and the dataset size {dataset_len}"
            )));
        }
        Ok(Self {
            seed,
            dataset_len,
            batch_size,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.dataset_len / self.batch_size
    }

    /// 0-based epoch of `step`.
    pub fn epoch(&self, step: usize) -> usize {
        step / self.steps_per_epoch()
    }

    /// Dataset indices of the batch at `step`.
    pub fn indices(&self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, step % spe);
        let mut order: Vec<usize> = (0..self.dataset_len).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, 0xE90C, epoch as u64]));
        order.shuffle(&mut rng);
        order[k * self.batch_size..(k + 1) * self.batch_size].to_vec()
    }
}

/// Batches for steps `start..end`, built ahead on a background thread.
pub struct Prefetcher<T: Send + 'static> {
    rx: Receiver<(usize, Result<T, DataError>)>,
    handle: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> std::fmt::Debug for Prefetcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefetcher")
    }
}

impl<T: Send + 'static> Prefetcher<T> {
    /// `build(step)` runs inside a rayon pool of `threads` threads, so it may use
    /// `par_iter` over the items of a batch; it is called for each step in order, from
    /// one thread, so it may keep state (a stream's position). At most `depth` batches
    /// wait in the queue.
    pub fn new(
        start: usize,
        end: usize,
        depth: usize,
        threads: usize,
        mut build: impl FnMut(usize) -> Result<T, DataError> + Send + 'static,
    ) -> Result<Self, DataError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("rankalign-data-{i}"))
            .build()
            .map_err(|e| DataError::Invalid(format!("cannot start the data threads: {e}")))?;
        let (tx, rx): (SyncSender<_>, _) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("rankalign-prefetch".into())
            .spawn(move || {
                for step in start..end {
                    let batch = pool.install(|| build(step));
                    let failed = batch.is_err();
                    if tx.send((step, batch)).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| DataError::Invalid(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            rx,
            handle: Some(handle),
        })
    }

    /// The next batch in step order, or `None` after the last.
    pub fn next_batch(&mut self) -> Option<(usize, Result<T, DataError>)> {
        self.rx.recv().ok()
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's next send fail, and it stops.
        let (_tx, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_each_epoch_once_and_is_reproducible() {
        let plan = BatchPlan::new(5, 10, 3).unwrap();
        assert_eq!(plan.steps_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|s| plan.indices(s)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        assert_eq!(
            plan.indices(4),
            BatchPlan::new(5, 10, 3).unwrap().indices(4)
        );
        assert_ne!(plan.indices(0), plan.indices(3), "epochs reshuffle");
    }

    #[test]
    fn prefetcher_yields_steps_in_order_and_stops_on_error() {
        let mut p = Prefetcher::new(2, 6, 2, 2, |s| {
            if s == 4 {
                Err(DataError::Invalid("boom".into()))
            } else {
                Ok(s * 10)
            }
        })
        .unwrap();
        assert_eq!(p.next_batch().map(|(s, b)| (s, b.unwrap())), Some((2, 20)));
        assert_eq!(p.next_batch().map(|(s, b)| (s, b.unwrap())), Some((3, 30)));
        let (s, err) = p.next_batch().unwrap();
        assert_eq!((s, err.unwrap_err().to_string()), (4, "boom".to_string()));
        assert!(p.next_batch().is_none());
    }

    #[test]
    fn bad_batch_size_is_an_error() {
        assert!(BatchPlan::new(0, 4, 5).is_err());
        assert!(BatchPlan::new(0, 4, 0).is_err());
    }
}
