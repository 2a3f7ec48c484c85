//! Running independent jobs (one lab's local training, one model's evaluation) on every
//! core, with results in input order.
//!
//! burn's CPU backend runs each model on one thread, so an experiment that trains its labs
//! one after another uses one core of two. Labs train independently within a round, so they
//! run on `available_parallelism()` worker threads; results come back in lab order and are
//! summed in that order, so the numbers are the same as a sequential run's, bit for bit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `f` applied to every item, on up to `available_parallelism()` threads, results in the
/// items' order.
pub fn map_in_order<T, R, F>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if workers <= 1 {
        return items.into_iter().map(f).collect();
    }
    let n = items.len();
    let queue: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let item = queue[i]
                        .lock()
                        .expect("no job panics while holding its slot")
                        .take()
                        .expect("each job is taken once");
                    let out = f(item);
                    *results[i]
                        .lock()
                        .expect("no job panics while holding its slot") = Some(out);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .expect("no job panicked")
                .expect("every job ran")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_input_order() {
        let out = map_in_order((0..50u64).collect(), |i| {
            std::thread::sleep(std::time::Duration::from_micros((50 - i) * 20));
            i * i
        });
        assert_eq!(out, (0..50u64).map(|i| i * i).collect::<Vec<_>>());
        assert!(map_in_order(Vec::<u8>::new(), |x| x).is_empty());
    }
}
