//! The token embedding, stored in row blocks small enough for any GPU binding.
//!
//! WebGPU caps one storage-buffer binding at `maxStorageBufferBindingSize`, 128 MiB by default
//! and on Mesa's lavapipe. Gemma 3's 262,144 × 640 embedding is 640 MiB in f32, so one tensor
//! cannot be bound: wgpu refuses the kernel. The table is split into blocks of at most
//! [`MAX_BLOCK_BYTES`]; lookups gather from every block (indices outside a block read its row 0
//! and are zeroed), and the tied output projection concatenates the blocks' logits. A
//! vocabulary that fits one block (SmolLM2's 49,152 × 576 is 108 MiB) takes the direct path.

use burn::module::{Module, Param};
use burn::tensor::module::linear;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Largest block, in bytes of f32: half the WebGPU default binding limit.
pub(crate) const MAX_BLOCK_BYTES: usize = 64 << 20;

/// A frozen `[vocab, hidden]` embedding table split by rows.
#[derive(Module, Debug)]
pub struct VocabEmbedding {
    blocks: Vec<Param<Tensor<2>>>,
    #[module(skip)]
    rows_per_block: usize,
    #[module(skip)]
    hidden: usize,
}

impl VocabEmbedding {
    /// Uploads the row-major `[vocab, hidden]` table `weights`, frozen.
    pub(crate) fn frozen(weights: Vec<f32>, vocab: usize, hidden: usize, device: &Device) -> Self {
        Self::with_block_bytes(weights, vocab, hidden, MAX_BLOCK_BYTES, device)
    }

    fn with_block_bytes(
        weights: Vec<f32>,
        vocab: usize,
        hidden: usize,
        block_bytes: usize,
        device: &Device,
    ) -> Self {
        let rows_per_block = (block_bytes / (hidden * 4).max(1)).clamp(1, vocab.max(1));
        let blocks = weights
            .chunks(rows_per_block * hidden)
            .map(|rows| {
                let n = rows.len() / hidden;
                Param::from_data(TensorData::new(rows.to_vec(), [n, hidden]), device)
                    .set_require_grad(false)
            })
            .collect();
        VocabEmbedding {
            blocks,
            rows_per_block,
            hidden,
        }
    }

    /// `[batch, seq]` token ids → `[batch, seq, hidden]` embeddings.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let flat = tokens.reshape([batch * seq]);
        let gathered = if self.blocks.len() == 1 {
            self.blocks[0].val().select(0, flat)
        } else {
            self.blocks
                .iter()
                .enumerate()
                .map(|(i, block)| {
                    let rows = block.dims()[0] as i64;
                    let local = flat.clone() - (i * self.rows_per_block) as i64;
                    let inside = local
                        .clone()
                        .greater_equal_elem(0)
                        .bool_and(local.clone().lower_elem(rows));
                    let rows_read = block.val().select(0, local.clamp(0, rows - 1));
                    rows_read * inside.float().unsqueeze_dim::<2>(1)
                })
                .reduce(|a, b| a + b)
                .expect("at least one block")
        };
        gathered.reshape([batch, seq, self.hidden])
    }

    /// The tied output projection: `[batch, seq, hidden]` → `[batch, seq, vocab]` logits.
    pub fn project(&self, h: Tensor<3>) -> Tensor<3> {
        let parts: Vec<Tensor<3>> = self
            .blocks
            .iter()
            .map(|w| linear(h.clone(), w.val().transpose(), None))
            .collect();
        if parts.len() == 1 {
            parts.into_iter().next().expect("one block")
        } else {
            Tensor::cat(parts, 2)
        }
    }

    /// The device the table lives on.
    pub fn device(&self) -> Device {
        self.blocks[0].lazy_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Split into blocks of 3 rows (the last one short), lookups and projections equal the
    /// one-block table's, including ids on block edges.
    #[test]
    fn blocks_give_the_same_lookups_and_logits_as_one_table() {
        let device = Device::flex();
        let (vocab, hidden) = (11, 4);
        let w: Vec<f32> = (0..vocab * hidden)
            .map(|v| (v as f32 * 0.37).sin())
            .collect();
        let whole = VocabEmbedding::frozen(w.clone(), vocab, hidden, &device);
        let split = VocabEmbedding::with_block_bytes(w, vocab, hidden, 3 * hidden * 4, &device);
        assert_eq!(whole.blocks.len(), 1);
        assert_eq!(split.blocks.len(), 4);
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 2, 3, 5, 6, 8, 9, 10], [2, 4]),
            &device,
        );
        let a = whole.forward(ids.clone());
        let b = split.forward(ids);
        a.clone()
            .into_data()
            .assert_eq(&b.clone().into_data(), true);
        let pa = whole.project(a).into_data();
        let pb = split.project(b).into_data();
        pa.assert_approx_eq::<f32>(&pb, Default::default());
    }
}
