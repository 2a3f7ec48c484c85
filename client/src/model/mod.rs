//! A Llama-style decoder with FFA-LoRA adapters, in burn 0.22.
//!
//! Token embedding → N × [RMSNorm → grouped-query causal self-attention with RoPE → residual;
//! RMSNorm → SwiGLU MLP → residual] → RMSNorm → lm_head (or the transposed embedding when
//! `tie_word_embeddings`). No biases. Every linear layer named in `LoraSpec::target_modules`
//! carries a LoRA branch whose A is frozen (drawn from the plan's shared seed) and whose B is
//! the only trained tensor; everything else is frozen.
//!
//! Modules, one job each: [`init`] draws the base weights, [`lora_linear`] is the adapted
//! linear layer, [`rope`], [`attention`], [`mlp`] and [`decoder`] are the blocks,
//! [`build`] assembles a model from a plan, [`adapter_io`] moves adapters in and out, and
//! [`batch`] and [`loss`] feed token windows in and score the predictions.

mod adapter_io;
mod attention;
pub mod batch;
mod build;
mod decoder;
mod init;
mod lora_linear;
pub(crate) mod loss;
mod mlp;
mod rope;
#[cfg(test)]
mod snapshot;
#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) use snapshot::parameters as snapshot_parameters;

pub use attention::{Attention, segment_mask};
pub use batch::RowBatch;
pub use decoder::DecoderLayer;
pub use lora_linear::{LoraBranch, LoraLinear};
pub use mlp::Mlp;
pub use rope::{RopeTables, RotaryEmbedding};

use burn::module::Module;
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::module::linear;
use burn::tensor::{Bool, Device, Int, Tensor};
use fedcore::{AdapterConfig, LoraSpec, ModelSpec};

/// The decoder with its adapters. Built for inference on a plain device; training converts it
/// to autodiff internally (see [`crate::train`]).
#[derive(Module, Debug)]
pub struct LoraLlama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the embedding doubles as the output projection.
    lm_head: Option<LoraLinear>,
    rope: RotaryEmbedding,
    #[module(skip)]
    spec: ModelSpec,
    #[module(skip)]
    lora: LoraSpec,
    #[module(skip)]
    adapter_config: AdapterConfig,
}

impl LoraLlama {
    /// Next-token logits: `[batch, seq]` token ids → `[batch, seq, vocab]`.
    ///
    /// `seq` must not exceed `max_position_embeddings` and ids must be below `vocab_size`
    /// (training and evaluation check both before calling this).
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.head(self.hidden(tokens))
    }

    /// Next-token logits for packed rows: several documents per row, each attending only to
    /// itself, with RoPE positions restarting at every document.
    ///
    /// `tokens`, `positions` and `segments` are `[batch, seq]`; `segments[b][i]` is the index
    /// of the document position `i` belongs to. Positions must be below
    /// `max_position_embeddings`.
    pub fn forward_packed(
        &self,
        tokens: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Tensor<2, Int>,
    ) -> Tensor<3> {
        self.head(self.hidden_packed(tokens, positions, segments))
    }

    /// The final normed hidden states `[batch, seq, hidden]`, before the output projection.
    fn hidden_with(
        &self,
        tokens: Tensor<2, Int>,
        rope: RopeTables,
        segments: Option<Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let mut h = self.embed_tokens.forward(tokens);
        for layer in &self.layers {
            h = layer.forward(h, &rope, segments.as_ref());
        }
        self.norm.forward(h)
    }

    /// Hidden states for plain causal rows (see [`Self::forward`]).
    pub(crate) fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let seq = tokens.dims()[1];
        self.hidden_with(tokens, self.rope.first(seq), None)
    }

    /// Hidden states for packed rows (see [`Self::forward_packed`]).
    pub(crate) fn hidden_packed(
        &self,
        tokens: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Tensor<2, Int>,
    ) -> Tensor<3> {
        let mask = segment_mask(segments);
        self.hidden_with(tokens, self.rope.at_positions(positions), Some(mask))
    }

    /// The output projection: hidden states → logits over the vocabulary.
    pub(crate) fn head(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => linear(h, self.embed_tokens.weight.val().transpose(), None),
        }
    }

    /// The architecture this model was built from.
    pub fn model_spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The LoRA layout this model was built with.
    pub fn lora_spec(&self) -> &LoraSpec {
        &self.lora
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.lazy_device()
    }

    /// Number of trained values (all LoRA B entries).
    pub fn trainable_params(&self) -> usize {
        self.spec
            .lora_modules(&self.lora.target_modules)
            .iter()
            .map(|m| m.out_features * self.lora.rank)
            .sum()
    }
}
