//! Grouped-query causal self-attention (Llama): `num_attention_heads` query heads share
//! `num_key_value_heads` key/value heads, queries and keys are rotated by RoPE, and each
//! position attends only to itself and earlier positions — and, in packed rows, only to
//! positions of its own document (`segment_mask`). Gemma 3 adds a per-head RMSNorm of queries
//! and keys before RoPE, its own score scale, and a sliding window on most layers
//! (`sliding_window_mask`).

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor};

use super::lora_linear::LoraLinear;
use super::rope::RopeTables;

#[derive(Module, Debug)]
pub struct Attention {
    pub(crate) q_proj: LoraLinear,
    pub(crate) k_proj: LoraLinear,
    pub(crate) v_proj: LoraLinear,
    pub(crate) o_proj: LoraLinear,
    /// Gemma 3's per-head norms of queries and keys (both or neither).
    pub(crate) qk_norms: Option<QkNorms>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Score scale; `None` is `head_dim^-½`.
    #[module(skip)]
    scale: Option<f64>,
}

/// RMSNorms over each query and key head (`q_norm`, `k_norm`, `[head_dim]` weights).
#[derive(Module, Debug)]
pub struct QkNorms {
    pub(crate) q_norm: RmsNorm,
    pub(crate) k_norm: RmsNorm,
}

impl Attention {
    pub(crate) fn new(
        q_proj: LoraLinear,
        k_proj: LoraLinear,
        v_proj: LoraLinear,
        o_proj: LoraLinear,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qk_norms: None,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: None,
        }
    }

    /// Gemma 3: per-head query/key norms and scores scaled by `scale`.
    pub(crate) fn with_gemma(mut self, qk_norms: QkNorms, scale: f64) -> Self {
        self.qk_norms = Some(qk_norms);
        self.scale = Some(scale);
        self
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`. `mask`, when given, is `[batch or 1,
    /// 1, seq, seq]`, true where a query may not attend to a key, on top of causality
    /// ([`segment_mask`], [`sliding_window_mask`]).
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: Option<&Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let heads =
            |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let mut q = heads(self.q_proj.forward(x.clone()), self.n_heads);
        let mut k = heads(self.k_proj.forward(x.clone()), self.n_kv_heads);
        if let Some(norms) = &self.qk_norms {
            q = norms.q_norm.forward(q);
            k = norms.k_norm.forward(k);
        }
        let q = rope.apply(q);
        let k = rope.apply(k);
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let group = self.n_heads / self.n_kv_heads;
        let options = AttentionModuleOptions {
            is_causal: true,
            scale: self.scale,
            ..Default::default()
        };
        let mask = mask.map(|m| m.clone().expand([batch, self.n_heads, seq, seq]));
        let out = attention(
            q,
            repeat_kv(k, group),
            repeat_kv(v, group),
            mask,
            None,
            options,
        );
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.n_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// For packed rows: `[batch, seq]` document ids → `[batch, 1, seq, seq]`, true where query
/// and key belong to different documents. Combined with the causal mask, every position sees
/// itself, so no row of the attention matrix is fully masked.
pub fn segment_mask(segments: Tensor<2, Int>) -> Tensor<4, Bool> {
    let [batch, seq] = segments.dims();
    let queries = segments
        .clone()
        .unsqueeze_dim::<3>(2)
        .expand([batch, seq, seq]);
    let keys = segments.unsqueeze_dim::<3>(1).expand([batch, seq, seq]);
    queries.not_equal(keys).unsqueeze_dim::<4>(1)
}

/// `[1, 1, seq, seq]`, true where the key lies `window` or more positions before the query:
/// with causality, each query sees itself and the `window − 1` positions before it (Gemma 3's
/// sliding layers, as transformers masks them). In packed rows positions restart per document,
/// but keys of other documents are masked anyway, so row distance is position distance.
pub fn sliding_window_mask(
    seq: usize,
    window: usize,
    device: &burn::tensor::Device,
) -> Tensor<4, Bool> {
    let queries = Tensor::<1, Int>::arange(0..seq as i64, device)
        .unsqueeze_dim::<2>(1)
        .expand([seq, seq]);
    let keys = Tensor::<1, Int>::arange(0..seq as i64, device)
        .unsqueeze_dim::<2>(0)
        .expand([seq, seq]);
    (queries - keys)
        .greater_equal_elem(window as i64)
        .unsqueeze_dim::<3>(0)
        .unsqueeze_dim::<4>(0)
}

/// `[b, kv_heads, s, d]` → `[b, kv_heads·group, s, d]`, query head `h` reading kv head
/// `h / group` (Hugging Face's `repeat_kv`).
fn repeat_kv(x: Tensor<4>, group: usize) -> Tensor<4> {
    if group == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, group, s, d])
        .reshape([b, h * group, s, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::WeightInit;
    use crate::model::rope::RotaryEmbedding;
    use burn::tensor::{Device, TensorData};

    /// `x [s, in] · Wᵀ` with `W [out, in]`, in f64.
    fn proj(x: &[f64], s: usize, w: &[f32], out: usize, inp: usize) -> Vec<f64> {
        let mut y = vec![0.0; s * out];
        for t in 0..s {
            for o in 0..out {
                y[t * out + o] = (0..inp)
                    .map(|k| x[t * inp + k] * w[o * inp + k] as f64)
                    .sum();
            }
        }
        y
    }

    /// HF rotate-half RoPE on one head vector at position `pos`.
    fn rope(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
        let d = v.len();
        let half = d / 2;
        let mut out = vec![0.0; d];
        for i in 0..half {
            let a = pos as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
            out[i] = v[i] * a.cos() - v[i + half] * a.sin();
            out[i + half] = v[i + half] * a.cos() + v[i] * a.sin();
        }
        out
    }

    /// Grouped-query causal attention written out by hand (as in HF `LlamaAttention`).
    #[test]
    fn matches_a_hand_written_llama_attention() {
        let (hidden, n_heads, n_kv, hd, seq) = (8, 4, 2, 2, 5);
        let device = Device::flex();
        let init = WeightInit::new(5);
        let wq = init.uniform("q", n_heads * hd, hidden, 0.4);
        let wk = init.uniform("k", n_kv * hd, hidden, 0.4);
        let wv = init.uniform("v", n_kv * hd, hidden, 0.4);
        let wo = init.uniform("o", hidden, n_heads * hd, 0.4);
        let lin = |w: &[f32], o, i| LoraLinear::frozen(w, o, i, &device);
        let attn = Attention::new(
            lin(&wq, n_heads * hd, hidden),
            lin(&wk, n_kv * hd, hidden),
            lin(&wv, n_kv * hd, hidden),
            lin(&wo, hidden, n_heads * hd),
            n_heads,
            n_kv,
            hd,
        );
        let rope_tables = RotaryEmbedding::new(hd, 16, 10_000.0, None, &device).first(seq);
        let x = init.uniform("x", seq, hidden, 1.0);
        let input = Tensor::<3>::from_data(TensorData::new(x.clone(), [1, seq, hidden]), &device);
        let got = attn
            .forward(input, &rope_tables, None)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();

        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let q = proj(&x64, seq, &wq, n_heads * hd, hidden);
        let k = proj(&x64, seq, &wk, n_kv * hd, hidden);
        let v = proj(&x64, seq, &wv, n_kv * hd, hidden);
        let head = |m: &[f64], width: usize, t: usize, h: usize| -> Vec<f64> {
            m[t * width + h * hd..t * width + (h + 1) * hd].to_vec()
        };
        let mut ctx = vec![0.0; seq * n_heads * hd];
        for h in 0..n_heads {
            let kv = h / (n_heads / n_kv);
            for t in 0..seq {
                let qt = rope(&head(&q, n_heads * hd, t, h), t, 10_000.0);
                let scores: Vec<f64> = (0..=t)
                    .map(|u| {
                        let ku = rope(&head(&k, n_kv * hd, u, kv), u, 10_000.0);
                        qt.iter().zip(&ku).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = exp.iter().sum();
                for (u, e) in exp.iter().enumerate() {
                    let vu = head(&v, n_kv * hd, u, kv);
                    for j in 0..hd {
                        ctx[t * n_heads * hd + h * hd + j] += e / z * vu[j];
                    }
                }
            }
        }
        let expected = proj(&ctx, seq, &wo, hidden, n_heads * hd);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((*g as f64 - e).abs() < 1e-5, "element {i}: {g} vs {e}");
        }
    }
}
