//! GGUF tensor names and layout to Hugging Face names and layout.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`) renames every tensor
//! (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`), writes dimensions
//! fastest-first (a `[out, in]` matrix is stored with `ne = [in, out]`; the bytes are the same
//! row-major data), and for Llama-architecture models permutes the rows of the q and k
//! projections so that llama.cpp can apply RoPE to adjacent pairs; Hugging Face's Llama rotates
//! the two halves of each head instead. This module undoes all three, so the model builder sees
//! exactly what a Hugging Face checkpoint holds.
//!
//! Gemma 3 files differ: `ffn_norm` is the MLP's input norm (`pre_feedforward_layernorm`;
//! Gemma's `post_attention_layernorm` norms the attention output, `post_attention_norm`),
//! there are query/key and MLP-output norms, q/k rows are not permuted (llama.cpp rotates
//! Gemma's halves as Hugging Face does), and every norm weight is stored as `1 + w` (the
//! converter adds Gemma's implicit one), so the one is subtracted back here.

use super::spec::Arch;

/// Hugging Face names of the non-layer tensors.
const GLOBALS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Hugging Face module (inside `model.layers.N.`) of each GGUF block tensor base name.
const LAYER_MODULES: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
];

/// Llama's MLP input norm (Hugging Face calls it `post_attention_layernorm`).
const LLAMA_NORMS: &[(&str, &str)] = &[("ffn_norm", "post_attention_layernorm")];

/// Gemma 3's norms beyond `attn_norm`.
const GEMMA3_NORMS: &[(&str, &str)] = &[
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// Which rotary permutation, if any, a tensor's rows carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkRole {
    /// The query projection (weight or bias): heads are `num_attention_heads`.
    Query,
    /// The key projection (weight or bias): heads are `num_key_value_heads`.
    Key,
}

/// A GGUF tensor name mapped to Hugging Face.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedName {
    pub hf: String,
    /// `Some` for q/k projections, whose rows llama.cpp permutes for Llama-architecture models.
    pub qk: Option<QkRole>,
    /// The file stores `1 + w` for this (Gemma 3 norm) weight: subtract one.
    pub minus_one: bool,
}

/// The Hugging Face name of a GGUF tensor of architecture `arch`, or `None` for tensors the
/// model does not load (`rope_freqs.weight`, vision towers, ...).
pub fn hf_name(gguf: &str, arch: Arch) -> Option<MappedName> {
    let gemma = arch == Arch::Gemma3;
    if let Some(&(_, hf)) = GLOBALS.iter().find(|(g, _)| *g == gguf) {
        return Some(MappedName {
            hf: hf.to_string(),
            qk: None,
            minus_one: gemma && gguf == "output_norm.weight",
        });
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Plain decimal only: `blk.+1.` or `blk.01.` would alias another layer's name.
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (base, kind) = rest.split_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let norms = if gemma { GEMMA3_NORMS } else { LLAMA_NORMS };
    let &(_, module) = LAYER_MODULES
        .iter()
        .chain(norms)
        .find(|(g, _)| *g == base)?;
    let qk = match base {
        "attn_q" if arch.permutes_qk() => Some(QkRole::Query),
        "attn_k" if arch.permutes_qk() => Some(QkRole::Key),
        _ => None,
    };
    Some(MappedName {
        hf: format!("model.layers.{layer}.{module}.{kind}"),
        qk,
        minus_one: gemma && base.ends_with("norm"),
    })
}

/// Hugging Face shape of a tensor stored with GGUF dimensions `dims` (fastest first).
pub fn hf_shape(dims: &[u64]) -> Vec<usize> {
    dims.iter().rev().map(|&d| d as usize).collect()
}

/// Undoes llama.cpp's q/k row permutation on a row-major `[rows, cols]` tensor (`cols = 1` for
/// a bias) of `n_head` heads.
///
/// The converter (`LlamaModel.permute`) reshapes the rows as `[n_head, 2, head_dim/2]` and swaps
/// the last two axes: Hugging Face row `h·D + s·D/2 + i` (head `h`, half `s`, index `i`) is
/// stored as row `h·D + 2i + s`. This is the inverse (transformers' `reverse_permute_weights`,
/// `reshape(n_head, D/2, 2).swapaxes(1, 2)`).
pub fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, String> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || data.len() != rows * cols {
        return Err(format!(
            "cannot undo the rotary row permutation: {rows} rows × {cols} columns ({} values) \
             do not split into {n_head} heads of an even width",
            data.len()
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let stored_row = h * head_dim + 2 * i + s;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&data[stored_row * cols..(stored_row + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_names() {
        let m = |g: &str| hf_name(g, Arch::Llama).map(|m| (m.hf, m.qk));
        assert_eq!(
            m("token_embd.weight"),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(m("output.weight"), Some(("lm_head.weight".into(), None)));
        assert_eq!(
            m("output_norm.weight"),
            Some(("model.norm.weight".into(), None))
        );
        assert_eq!(
            m("blk.12.attn_q.weight"),
            Some((
                "model.layers.12.self_attn.q_proj.weight".into(),
                Some(QkRole::Query)
            ))
        );
        assert_eq!(
            m("blk.0.attn_k.bias"),
            Some((
                "model.layers.0.self_attn.k_proj.bias".into(),
                Some(QkRole::Key)
            ))
        );
        assert_eq!(
            m("blk.3.attn_v.bias"),
            Some(("model.layers.3.self_attn.v_proj.bias".into(), None))
        );
        assert_eq!(
            m("blk.1.attn_output.weight"),
            Some(("model.layers.1.self_attn.o_proj.weight".into(), None))
        );
        assert_eq!(
            m("blk.1.ffn_down.weight"),
            Some(("model.layers.1.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(
            m("blk.1.ffn_norm.weight"),
            Some((
                "model.layers.1.post_attention_layernorm.weight".into(),
                None
            ))
        );
        assert_eq!(
            m("blk.1.attn_norm.weight"),
            Some(("model.layers.1.input_layernorm.weight".into(), None))
        );
        for ignored in [
            "rope_freqs.weight",
            "blk.1.attn_rot_embd",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk.1.attn_q.scale",
            "blk..attn_q.weight",
        ] {
            assert_eq!(hf_name(ignored, Arch::Llama), None, "{ignored}");
        }
        assert_eq!(hf_shape(&[576, 192]), vec![192, 576]);
        // Gemma's extra norms mean nothing in a Llama file.
        assert_eq!(hf_name("blk.0.post_ffw_norm.weight", Arch::Llama), None);
    }

    #[test]
    fn maps_gemma3_names_with_their_norm_offset() {
        let m = |g: &str| hf_name(g, Arch::Gemma3).map(|m| (m.hf, m.qk, m.minus_one));
        let norm = |hf: &str| Some((hf.to_string(), None, true));
        assert_eq!(
            m("blk.2.attn_norm.weight"),
            norm("model.layers.2.input_layernorm.weight")
        );
        assert_eq!(
            m("blk.2.attn_q_norm.weight"),
            norm("model.layers.2.self_attn.q_norm.weight")
        );
        assert_eq!(
            m("blk.2.attn_k_norm.weight"),
            norm("model.layers.2.self_attn.k_norm.weight")
        );
        assert_eq!(
            m("blk.2.post_attention_norm.weight"),
            norm("model.layers.2.post_attention_layernorm.weight")
        );
        assert_eq!(
            m("blk.2.ffn_norm.weight"),
            norm("model.layers.2.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            m("blk.2.post_ffw_norm.weight"),
            norm("model.layers.2.post_feedforward_layernorm.weight")
        );
        assert_eq!(m("output_norm.weight"), norm("model.norm.weight"));
        // Projections are neither permuted nor offset; the embedding is not offset.
        assert_eq!(
            m("blk.0.attn_q.weight"),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), None, false))
        );
        assert_eq!(
            m("token_embd.weight"),
            Some(("model.embed_tokens.weight".into(), None, false))
        );
    }

    /// llama.cpp's `permute`, written out as the converter does it, for the round trip.
    fn permute(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let d = rows / n_head;
        let mut out = vec![0.0; data.len()];
        // reshape(n_head, 2, d/2, cols).swapaxes(1, 2): out[h, i, s] = in[h, s, i]
        for h in 0..n_head {
            for i in 0..d / 2 {
                for s in 0..2 {
                    let dst = h * d + i * 2 + s;
                    let src = h * d + s * (d / 2) + i;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&data[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let stored = permute(&w, rows, cols, heads);
        assert_ne!(stored, w);
        assert_eq!(unpermute_rows(&stored, rows, cols, heads).unwrap(), w);
        // Head 0 of width 8: stored rows 0..8 are HF rows 0,4,1,5,2,6,3,7.
        let bias: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let stored = permute(&bias, 8, 1, 1);
        assert_eq!(stored, vec![0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        assert_eq!(unpermute_rows(&stored, 8, 1, 1).unwrap(), bias);
        assert!(unpermute_rows(&bias, 8, 1, 3).is_err());
    }
}
