//! Packing examples into fixed-length training rows.
//!
//! Rows hold several short examples side by side, so little of a batch is padding, while
//! `positions` and `segments` let the model treat each as if it were alone: RoPE positions
//! restart at 0 for every piece, and attention never crosses a segment.
//!
//! # The layout, precisely
//!
//! An example of `n` tokens makes `n − 1` predictions: slot `j` of its piece has input
//! `tokens[j]` and target `tokens[j + 1]`, with weight `1.0` exactly when
//! `loss_mask[j + 1]`. Its last token is never an input (nothing of the example follows it),
//! so no target ever crosses into another example or into padding.
//!
//! - Examples are placed greedily, in order. An example with at most `seq_len` predictions
//!   is never split: if it does not fit in the space left in the current row, that row is
//!   padded and closed and the example starts the next one.
//! - An example with more than `seq_len` predictions starts a fresh row and is cut into
//!   pieces of `seq_len` predictions (the last piece shorter), like evaluation windows: piece
//!   `c` has inputs `tokens[c·L .. c·L + len]` and targets one further, so consecutive pieces
//!   share one token (the last target of a piece is the first input of the next) and every
//!   prediction is made exactly once, with its own `loss_mask` weight. The first token of a
//!   continuation loses its context, since positions restart and attention stays in the row.
//!   Its final, shorter piece leaves room in its row for the examples that follow.
//! - A piece none of whose targets is trained (weight 0 throughout: a prompt cut off from
//!   its reply, a one-token example) is left out: confined to its segment, it could affect
//!   nothing.
//! - Padding after the last piece: input and target 0, weight 0, positions counting from 0,
//!   and a segment of its own (one past the last piece's).

use super::examples::Example;

/// One training row of `seq_len` slots.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRow {
    /// `seq_len` token ids (padding id 0 after the last document).
    pub inputs: Vec<u32>,
    /// The next token for each input position (0 under padding).
    pub targets: Vec<u32>,
    /// 1.0 where the target counts in the loss, else 0.0.
    pub weights: Vec<f32>,
    /// RoPE position, restarting at 0 for each piece (document or part of one) in the row.
    pub positions: Vec<u32>,
    /// Index of the piece within the row (0, 1, 2, …); attention never crosses segments;
    /// padding gets its own segment.
    pub segments: Vec<u32>,
}

impl PackedRow {
    fn with_capacity(seq_len: usize) -> Self {
        PackedRow {
            inputs: Vec::with_capacity(seq_len),
            targets: Vec::with_capacity(seq_len),
            weights: Vec::with_capacity(seq_len),
            positions: Vec::with_capacity(seq_len),
            segments: Vec::with_capacity(seq_len),
        }
    }

    /// Number of slots whose target counts in the loss.
    pub fn trained_targets(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

/// The training loop's row type has the same fields and meaning.
impl From<PackedRow> for crate::train::source::TrainRow {
    fn from(row: PackedRow) -> Self {
        crate::train::source::TrainRow {
            inputs: row.inputs,
            targets: row.targets,
            weights: row.weights,
            positions: row.positions,
            segments: row.segments,
        }
    }
}

/// Fills rows in order; see the [module documentation](self) for the layout.
struct Packer {
    seq_len: usize,
    rows: Vec<PackedRow>,
    row: PackedRow,
    segment: u32,
}

impl Packer {
    fn free(&self) -> usize {
        self.seq_len - self.row.inputs.len()
    }

    /// Appends predictions `start .. start + len` of `example` as one segment.
    fn place(&mut self, example: &Example, start: usize, len: usize) {
        let mask = &example.loss_mask[start + 1..start + len + 1];
        if !mask.iter().any(|&m| m) {
            return;
        }
        if self.free() < len {
            self.close();
        }
        let row = &mut self.row;
        row.inputs
            .extend_from_slice(&example.tokens[start..start + len]);
        row.targets
            .extend_from_slice(&example.tokens[start + 1..start + len + 1]);
        row.weights
            .extend(mask.iter().map(|&m| if m { 1.0 } else { 0.0 }));
        row.positions.extend(0..len as u32);
        row.segments.extend(std::iter::repeat_n(self.segment, len));
        self.segment += 1;
    }

    /// Pads the current row (if it holds anything) and starts a new one.
    fn close(&mut self) {
        if self.row.inputs.is_empty() {
            return;
        }
        let pad = self.free();
        let row = &mut self.row;
        row.inputs.extend(std::iter::repeat_n(0, pad));
        row.targets.extend(std::iter::repeat_n(0, pad));
        row.weights.extend(std::iter::repeat_n(0.0, pad));
        row.positions.extend(0..pad as u32);
        row.segments.extend(std::iter::repeat_n(self.segment, pad));
        let full = std::mem::replace(&mut self.row, PackedRow::with_capacity(self.seq_len));
        self.rows.push(full);
        self.segment = 0;
    }
}

/// Packs `examples` into rows of `seq_len` slots (none if `seq_len` is 0).
pub fn pack(examples: &[Example], seq_len: usize) -> Vec<PackedRow> {
    if seq_len == 0 {
        return Vec::new();
    }
    let mut packer = Packer {
        seq_len,
        rows: Vec::new(),
        row: PackedRow::with_capacity(seq_len),
        segment: 0,
    };
    for example in examples {
        debug_assert_eq!(example.tokens.len(), example.loss_mask.len());
        let predictions = example
            .tokens
            .len()
            .min(example.loss_mask.len())
            .saturating_sub(1);
        if predictions <= seq_len {
            if predictions > 0 {
                packer.place(example, 0, predictions);
            }
            continue;
        }
        packer.close();
        for start in (0..predictions).step_by(seq_len) {
            packer.place(example, start, seq_len.min(predictions - start));
        }
    }
    packer.close();
    packer.rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(tokens: &[u32], mask: &[bool]) -> Example {
        Example {
            tokens: tokens.to_vec(),
            loss_mask: mask.to_vec(),
        }
    }

    const T: bool = true;
    const F: bool = false;

    #[test]
    fn short_examples_share_a_row_with_restarting_positions() {
        let a = ex(&[10, 11, 12], &[T, T, T]);
        let b = ex(&[20, 21, 22, 23], &[F, F, T, T]); // prompt 20, 21; reply 22, 23
        let rows = pack(&[a, b], 8);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        // a: 2 slots, b: 3 slots, padding: 3 slots.
        assert_eq!(r.inputs, [10, 11, 20, 21, 22, 0, 0, 0]);
        assert_eq!(r.targets, [11, 12, 21, 22, 23, 0, 0, 0]);
        assert_eq!(r.weights, [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(r.positions, [0, 1, 0, 1, 2, 0, 1, 2]);
        assert_eq!(r.segments, [0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(r.trained_targets(), 4);
    }

    #[test]
    fn an_example_that_does_not_fit_starts_a_new_row() {
        let a = ex(&[1, 2, 3, 4], &[T; 4]); // 3 slots
        let b = ex(&[5, 6, 7], &[T; 3]); // 2 slots: does not fit in the 1 left
        let c = ex(&[8, 9], &[T; 2]); // 1 slot: fits after b
        let rows = pack(&[a, b, c], 4);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].inputs, [1, 2, 3, 0]);
        assert_eq!(rows[0].weights, [1.0, 1.0, 1.0, 0.0]);
        assert_eq!(rows[0].segments, [0, 0, 0, 1]);
        assert_eq!(rows[1].inputs, [5, 6, 8, 0]);
        assert_eq!(rows[1].targets, [6, 7, 9, 0]);
        assert_eq!(rows[1].positions, [0, 1, 0, 0]);
        assert_eq!(rows[1].segments, [0, 0, 1, 2]);
        // A row filled exactly has no padding segment.
        let rows = pack(&[ex(&[1, 2, 3, 4, 5], &[T; 5])], 4);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].segments, [0; 4]);
        assert_eq!(rows[0].targets, [2, 3, 4, 5]);
    }

    /// A long example is cut into pieces of seq_len predictions sharing one token, every
    /// prediction made exactly once with its own weight, positions restarting per piece.
    #[test]
    fn long_examples_are_split_across_rows() {
        let short = ex(&[90, 91], &[T, T]);
        let tokens: Vec<u32> = (100..111).collect(); // 11 tokens, 10 predictions
        let mut mask = vec![T; 11];
        mask[4] = false; // predicting 104 does not count
        let long = ex(&tokens, &mask);
        let tail = ex(&[80, 81], &[T, T]);
        let rows = pack(&[short, long, tail], 4);
        assert_eq!(rows.len(), 4);
        // The short example's row is closed before the long one starts.
        assert_eq!(rows[0].inputs, [90, 0, 0, 0]);
        assert_eq!(rows[1].inputs, [100, 101, 102, 103]);
        assert_eq!(rows[1].targets, [101, 102, 103, 104]);
        assert_eq!(rows[1].weights, [1.0, 1.0, 1.0, 0.0]);
        assert_eq!(rows[2].inputs, [104, 105, 106, 107]);
        assert_eq!(rows[2].targets, [105, 106, 107, 108]);
        assert_eq!(rows[2].positions, [0, 1, 2, 3]);
        assert_eq!(rows[2].weights, [1.0; 4]);
        // The last, shorter piece leaves room for what follows.
        assert_eq!(rows[3].inputs, [108, 109, 80, 0]);
        assert_eq!(rows[3].targets, [109, 110, 81, 0]);
        assert_eq!(rows[3].positions, [0, 1, 0, 0]);
        assert_eq!(rows[3].segments, [0, 0, 1, 2]);
        assert_eq!(rows[3].weights, [1.0, 1.0, 1.0, 0.0]);
        // Every trained prediction of the long example appears exactly once.
        let long_targets: Vec<u32> = rows[1..4]
            .iter()
            .flat_map(|r| r.targets.iter().zip(&r.segments).zip(&r.weights))
            .filter(|((t, _), _)| (101..=110).contains(*t))
            .map(|((t, _), _)| *t)
            .collect();
        assert_eq!(long_targets, (101..=110).collect::<Vec<_>>());
    }

    #[test]
    fn packed_rows_feed_the_training_loops_row_source() {
        use crate::train::source::{BatchSource, ShuffledRows, TrainRow};
        let rows = pack(&[ex(&[1, 2, 3], &[F, T, T]), ex(&[4, 5], &[T, T])], 4);
        let row = rows[0].clone();
        let train: TrainRow = row.clone().into();
        assert_eq!(train.inputs, row.inputs);
        assert_eq!(train.weights, row.weights);
        assert_eq!(train.segments, row.segments);
        let mut source = ShuffledRows::new(vec![train], 1, 7).unwrap();
        let batch = source.next_batch().unwrap();
        assert_eq!(batch.positions, row.positions);
        assert_eq!(batch.trained_targets(), 3.0);
    }

    #[test]
    fn padding_and_untrained_pieces_weigh_nothing() {
        // A prompt-only piece of a long example and a one-token example are left out.
        let long = ex(&[1, 2, 3, 4, 5, 6], &[F, F, F, T, T, T]);
        let one = ex(&[7], &[T]);
        let none = ex(&[8, 9], &[T, F]);
        let rows = pack(&[long, one, none], 2);
        // Pieces: [1,2]->[2,3] untrained (dropped); [3,4]->[4,5]; [5]->[6].
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].inputs, [3, 4]);
        assert_eq!(rows[0].weights, [1.0, 1.0]);
        assert_eq!(rows[1].inputs, [5, 0]);
        assert_eq!(rows[1].weights, [1.0, 0.0]);
        assert_eq!(rows[1].segments, [0, 1]);
        assert_eq!((rows[1].targets[1], rows[1].positions[1]), (0, 0));
        assert!(pack(&[], 4).is_empty());
        assert!(pack(&[ex(&[1, 2], &[T, T])], 0).is_empty());
    }
}
