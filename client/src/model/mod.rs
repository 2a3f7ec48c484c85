//! A Llama-family or Gemma 3 decoder with LoRA adapters, in burn 0.22.
//!
//! Token embedding → N × [RMSNorm → grouped-query causal self-attention with RoPE → residual;
//! RMSNorm → gated MLP → residual] → RMSNorm → lm_head (or the transposed embedding when
//! `tie_word_embeddings`). Gemma 3 (`fedcore::Architecture::Gemma3`) scales the embeddings,
//! norms attention and MLP outputs too, norms query and key heads, uses GeGLU, and gives most
//! layers a sliding attention window with its own RoPE base; its RMSNorm scales by `1 + w`,
//! which the builder folds into the norm weights at load. Every linear layer named in
//! `LoraSpec::target_modules` carries a LoRA branch; the base is frozen.
//!
//! Modules, one job each: [`init`] draws the base weights, [`embedding`] holds the token
//! table in row blocks any GPU can bind, [`lora_linear`] is the adapted linear layer,
//! [`rope`], [`attention`], [`mlp`] and [`decoder`] are the blocks,
//! [`build`] assembles a model from a plan, [`adapter_io`] moves adapters in and out, and
//! [`batch`] and [`loss`] feed token windows in and score the predictions.

mod adapter_io;
mod attention;
pub mod batch;
mod build;
mod decoder;
mod embedding;
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

pub use attention::{Attention, segment_mask, sliding_window_mask};
pub use batch::RowBatch;
pub use decoder::DecoderLayer;
pub use embedding::VocabEmbedding;
pub use lora_linear::{LoraBranch, LoraLinear};
pub use mlp::Mlp;
pub use rope::{RopeTables, RotaryEmbedding};

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Bool, Device, Int, Tensor};
use fedcore::{AdapterConfig, LoraSpec, ModelSpec};

/// Gemma 3's sliding-window layers: their window, RoPE tables, and which layers are global.
#[derive(Module, Debug)]
pub struct LocalAttention {
    rope: RotaryEmbedding,
    #[module(skip)]
    window: usize,
    /// `full_attention[i]`: layer `i` attends globally with the model's main RoPE tables.
    #[module(skip)]
    full_attention: Vec<bool>,
}

/// The decoder with its adapters. Built for inference on a plain device; training converts it
/// to autodiff internally (see [`crate::train`]).
#[derive(Module, Debug)]
pub struct LoraLlama {
    embed_tokens: VocabEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the embedding doubles as the output projection.
    lm_head: Option<LoraLinear>,
    rope: RotaryEmbedding,
    /// Gemma 3's sliding-window attention; `None` when every layer attends globally.
    local_attention: Option<LocalAttention>,
    /// Gemma 3 multiplies token embeddings by `√hidden_size` (not the tied output head).
    #[module(skip)]
    embed_scale: Option<f32>,
    /// The token every window of running text starts with, when the checkpoint's tokenizer
    /// begins every document with one (Gemma's `<bos>`; see [`Self::window_prefix`]).
    #[module(skip)]
    window_prefix: Option<u32>,
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
    /// `positions` are per-token RoPE positions (`None`: `0..seq`), `segments` the
    /// packed-document mask.
    fn hidden_with(
        &self,
        tokens: Tensor<2, Int>,
        positions: Option<Tensor<2, Int>>,
        segments: Option<Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let tables = |rope: &RotaryEmbedding| match &positions {
            None => rope.first(seq),
            Some(p) => rope.at_positions(p.clone()),
        };
        let global = tables(&self.rope);
        let local = self.local_attention.as_ref().map(|local| {
            let window = sliding_window_mask(seq, local.window, &self.device());
            let mask = match &segments {
                None => window,
                Some(s) => s.clone().bool_or(window.expand([batch, 1, seq, seq])),
            };
            (tables(&local.rope), mask, &local.full_attention)
        });
        let mut h = self.embed_tokens.forward(tokens);
        if let Some(scale) = self.embed_scale {
            h = h * scale;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            h = match &local {
                Some((rope, mask, full)) if !full[i] => layer.forward(h, rope, Some(mask)),
                _ => layer.forward(h, &global, segments.as_ref()),
            };
        }
        self.norm.forward(h)
    }

    /// Hidden states for plain causal rows (see [`Self::forward`]).
    pub(crate) fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.hidden_with(tokens, None, None)
    }

    /// Hidden states for packed rows (see [`Self::forward_packed`]).
    pub(crate) fn hidden_packed(
        &self,
        tokens: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Tensor<2, Int>,
    ) -> Tensor<3> {
        let mask = segment_mask(segments);
        self.hidden_with(tokens, Some(positions), Some(mask))
    }

    /// The output projection: hidden states → logits over the vocabulary.
    pub(crate) fn head(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.project(h),
        }
    }

    /// The token training and evaluation windows of running text start with: the `<bos>`
    /// the checkpoint's tokenizer puts at the start of every document, `None` when it adds
    /// none (SmolLM2, the byte-level presets). Gemma reads text without it badly (2.6 vs 6.1
    /// nats per token on an English sentence), so a window cut from the middle of a text
    /// gets it too, as it would as a document of its own.
    pub fn window_prefix(&self) -> Option<u32> {
        self.window_prefix
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
        self.embed_tokens.device()
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
