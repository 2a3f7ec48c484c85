//! Where training batches come from.
//!
//! - [`RandomWindows`]: windows of `seq_len + 1` tokens drawn uniformly from one token stream
//!   (a lab's running text); what a federated round uses.
//! - [`ShuffledRows`]: prepared rows (packed documents with loss weights, e.g. instruction
//!   data) visited in a fresh seeded shuffle every epoch.
//!
//! Both are seeded (ChaCha8), so a run is reproducible on any machine and backend.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ModelError;
use crate::model::RowBatch;

/// Yields the next micro-batch.
pub trait BatchSource {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError>;
}

/// `rows` random windows of `seq_len` predictions per batch, uniform over the stream: `seq_len
/// + 1` tokens each, or `seq_len` after the model's `prefix` (see [`RowBatch::windows_after`]).
pub struct RandomWindows<'a> {
    tokens: &'a [u32],
    rows: usize,
    seq_len: usize,
    prefix: Option<u32>,
    rng: ChaCha8Rng,
}

impl<'a> RandomWindows<'a> {
    /// Refuses a stream shorter than one window. `prefix` is
    /// [`LoraLlama::window_prefix`](crate::model::LoraLlama::window_prefix).
    pub fn new(
        tokens: &'a [u32],
        rows: usize,
        seq_len: usize,
        prefix: Option<u32>,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let window = seq_len + usize::from(prefix.is_none());
        if tokens.len() < window {
            return Err(ModelError::TooFewTokens {
                what: "training corpus",
                tokens: tokens.len(),
                needed: window,
            });
        }
        Ok(RandomWindows {
            tokens,
            rows,
            seq_len,
            prefix,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }
}

impl BatchSource for RandomWindows<'_> {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
        let window = self.seq_len + usize::from(self.prefix.is_none());
        let last_start = self.tokens.len() - window;
        let starts: Vec<usize> = (0..self.rows)
            .map(|_| self.rng.random_range(0..=last_start))
            .collect();
        Ok(RowBatch::windows_after(
            self.prefix,
            self.tokens,
            &starts,
            self.seq_len,
        ))
    }
}

/// One prepared row of `seq` positions (see [`RowBatch`] for the fields' meaning).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRow {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

impl TrainRow {
    /// The rows side by side as one packed batch. Rows must have one length, as
    /// [`ShuffledRows::new`] and packing guarantee; a ragged batch is refused by the shape
    /// check before it reaches the device.
    pub fn batch(rows: &[&TrainRow]) -> RowBatch {
        let seq = rows.first().map_or(0, |r| r.inputs.len());
        let cap = rows.len() * seq;
        let mut batch = RowBatch {
            rows: rows.len(),
            seq,
            inputs: Vec::with_capacity(cap),
            targets: Vec::with_capacity(cap),
            weights: Vec::with_capacity(cap),
            positions: Vec::with_capacity(cap),
            segments: Vec::with_capacity(cap),
            packed: true,
        };
        for row in rows {
            batch.inputs.extend_from_slice(&row.inputs);
            batch.targets.extend_from_slice(&row.targets);
            batch.weights.extend_from_slice(&row.weights);
            batch.positions.extend_from_slice(&row.positions);
            batch.segments.extend_from_slice(&row.segments);
        }
        batch
    }
}

/// Prepared rows, `rows_per_batch` at a time, reshuffled at every epoch.
pub struct ShuffledRows {
    rows: Vec<TrainRow>,
    rows_per_batch: usize,
    order: Vec<usize>,
    next: usize,
    epoch: usize,
    rng: ChaCha8Rng,
}

impl ShuffledRows {
    /// Refuses an empty set or rows of different lengths.
    pub fn new(rows: Vec<TrainRow>, rows_per_batch: usize, seed: u64) -> Result<Self, ModelError> {
        let Some(first) = rows.first() else {
            return Err(ModelError::TooFewTokens {
                what: "training set",
                tokens: 0,
                needed: 1,
            });
        };
        let seq = first.inputs.len();
        if let Some(bad) = rows.iter().find(|r| r.inputs.len() != seq) {
            return Err(ModelError::BatchShape {
                field: "inputs",
                len: bad.inputs.len(),
                rows: 1,
                seq,
            });
        }
        let mut source = ShuffledRows {
            order: (0..rows.len()).collect(),
            rows,
            rows_per_batch,
            next: 0,
            epoch: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        source.order.shuffle(&mut source.rng);
        Ok(source)
    }

    /// Completed passes over the rows.
    pub fn epochs(&self) -> usize {
        self.epoch
    }
}

impl BatchSource for ShuffledRows {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
        let mut picked = Vec::with_capacity(self.rows_per_batch);
        for _ in 0..self.rows_per_batch {
            if self.next == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.next = 0;
                self.epoch += 1;
            }
            picked.push(&self.rows[self.order[self.next]]);
            self.next += 1;
        }
        Ok(TrainRow::batch(&picked))
    }
}
