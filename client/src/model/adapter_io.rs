//! Moving the LoRA adapter between the model's tensors and fedcore's [`LoraAdapter`] (PEFT
//! layout, canonical Hugging Face module names): export after local training, load the
//! global adapter at the start of each round.

use std::collections::{BTreeMap, HashSet};

use fedcore::{LoraAdapter, Matrix, TargetModule};

use super::LoraLlama;
use super::decoder::DecoderLayer;
use super::lora_linear::LoraLinear;
use crate::error::ModelError;

impl DecoderLayer {
    fn target(&self, target: TargetModule) -> &LoraLinear {
        match target {
            TargetModule::Q => &self.self_attn.q_proj,
            TargetModule::K => &self.self_attn.k_proj,
            TargetModule::V => &self.self_attn.v_proj,
            TargetModule::O => &self.self_attn.o_proj,
            TargetModule::Gate => &self.mlp.gate_proj,
            TargetModule::Up => &self.mlp.up_proj,
            TargetModule::Down => &self.mlp.down_proj,
        }
    }

    fn target_mut(&mut self, target: TargetModule) -> &mut LoraLinear {
        match target {
            TargetModule::Q => &mut self.self_attn.q_proj,
            TargetModule::K => &mut self.self_attn.k_proj,
            TargetModule::V => &mut self.self_attn.v_proj,
            TargetModule::O => &mut self.self_attn.o_proj,
            TargetModule::Gate => &mut self.mlp.gate_proj,
            TargetModule::Up => &mut self.mlp.up_proj,
            TargetModule::Down => &mut self.mlp.down_proj,
        }
    }
}

impl LoraLlama {
    /// `(name, layer, target)` of every adapted module, in the model's order.
    fn adapted(&self) -> Vec<(String, usize, TargetModule)> {
        (0..self.layers.len())
            .flat_map(|layer| {
                TargetModule::ALL
                    .into_iter()
                    .filter(|t| self.lora.target_modules.contains(t))
                    .map(move |t| {
                        (
                            format!("model.layers.{layer}.{}", t.path_suffix()),
                            layer,
                            t,
                        )
                    })
            })
            .collect()
    }

    /// The current adapter (A and B in PEFT layout), read back from the device.
    ///
    /// # Panics
    ///
    /// When the device fails to read a tensor back (a lost GPU); use
    /// [`try_export_adapter`](Self::try_export_adapter) to get that as an error.
    pub fn export_adapter(&self) -> LoraAdapter {
        match self.try_export_adapter() {
            Ok(adapter) => adapter,
            Err(err) => panic!("exporting the LoRA adapter failed: {err}"),
        }
    }

    /// The current adapter, or the backend error that prevented reading it.
    pub fn try_export_adapter(&self) -> Result<LoraAdapter, ModelError> {
        let mut modules = Vec::new();
        for (name, layer, target) in self.adapted() {
            let module = self.layers[layer]
                .target(target)
                .read_lora()?
                .ok_or_else(|| ModelError::MissingModule(name.clone()))?;
            modules.push((name, module));
        }
        Ok(LoraAdapter::new(self.adapter_config.clone(), modules)?)
    }

    /// Chooses which LoRA factors train from now on, in every adapted module: B alone is
    /// FFA-LoRA (the default a model is built with); A alone is a RoLoRA A round; both are
    /// FedIT, HetLoRA and FedSA-LoRA. Base weights, biases and norms never train. Loading an
    /// adapter keeps this choice.
    pub fn set_trainable(mut self, a: bool, b: bool) -> Self {
        for (_, layer, target) in self.adapted() {
            self.layers[layer]
                .target_mut(target)
                .set_lora_trainable(a, b);
        }
        self
    }

    /// Gives every trained LoRA factor `n` per-example copies for the next batch of `n`
    /// examples (DP-SGD's per-example gradients in one backward pass; see
    /// `LoraLinear::expand_per_example`), returning them with the ids of the factors.
    pub(crate) fn expand_per_example(&mut self, n: usize) -> Vec<super::lora_linear::PerExample> {
        let mut out = Vec::new();
        for (_, layer, target) in self.adapted() {
            out.extend(self.layers[layer].target_mut(target).expand_per_example(n));
        }
        out
    }

    /// Sets A and B of every adapted module from `adapter`. The adapter must carry exactly the
    /// modules this model adapts, with the model's rank and alpha; everything is checked before
    /// anything is written. Which factors train is kept (see [`Self::set_trainable`]).
    pub fn load_adapter(mut self, adapter: &LoraAdapter) -> Result<Self, ModelError> {
        let config = adapter.config();
        if config.rank != self.lora.rank {
            return Err(ModelError::AdapterConfig {
                field: "rank",
                expected: self.lora.rank.to_string(),
                found: config.rank.to_string(),
            });
        }
        if config.alpha.to_bits() != self.lora.alpha.to_bits() {
            return Err(ModelError::AdapterConfig {
                field: "alpha",
                expected: self.lora.alpha.to_string(),
                found: config.alpha.to_string(),
            });
        }
        let adapted = self.adapted();
        let expected: HashSet<&str> = adapted.iter().map(|(n, _, _)| n.as_str()).collect();
        if let Some((extra, _)) = adapter
            .modules()
            .iter()
            .find(|(name, _)| !expected.contains(name.as_str()))
        {
            return Err(ModelError::UnexpectedModule(extra.clone()));
        }
        let mut updates = Vec::with_capacity(adapted.len());
        for (name, layer, target) in &adapted {
            let module = adapter
                .module(name)
                .ok_or_else(|| ModelError::MissingModule(name.clone()))?;
            self.layers[*layer]
                .target(*target)
                .check_lora(name, module)?;
            updates.push((name, *layer, *target, module));
        }
        for (name, layer, target, module) in updates {
            self.layers[layer]
                .target_mut(target)
                .load_lora(name, module)?;
        }
        Ok(self)
    }

    /// Sets the dense corrections merged into the base weights (FedEx-LoRA's
    /// `GlobalModel::base_delta`, `[out, in]` per adapted module, already scaled): each
    /// adapted module's effective base becomes `W₀ + D`. An empty map removes every
    /// correction; a non-empty one must name exactly the adapted modules. Everything is
    /// checked before anything is written; the checkpoint's own weights are never changed.
    pub fn load_base_delta(
        mut self,
        base_delta: &BTreeMap<String, Matrix>,
    ) -> Result<Self, ModelError> {
        let adapted = self.adapted();
        if base_delta.is_empty() {
            for (name, layer, target) in &adapted {
                self.layers[*layer]
                    .target_mut(*target)
                    .load_base_delta(name, None)?;
            }
            return Ok(self);
        }
        let expected: HashSet<&str> = adapted.iter().map(|(n, _, _)| n.as_str()).collect();
        if let Some(extra) = base_delta.keys().find(|n| !expected.contains(n.as_str())) {
            return Err(ModelError::UnexpectedModule(extra.clone()));
        }
        for (name, layer, target) in &adapted {
            let delta = base_delta
                .get(name)
                .ok_or_else(|| ModelError::MissingModule(format!("{name} (base_delta)")))?;
            self.layers[*layer]
                .target(*target)
                .check_base_delta(name, delta)?;
        }
        for (name, layer, target) in &adapted {
            self.layers[*layer]
                .target_mut(*target)
                .load_base_delta(name, base_delta.get(name))?;
        }
        Ok(self)
    }
}
