//! Next-token negative log-likelihood, shared by training (mean) and evaluation (sum).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Per-token NLL in nats: logits `[batch, seq, vocab]`, targets `[batch, seq]` →
/// `-log softmax(logits)[target]`, `[batch, seq]`.
pub(crate) fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let log_probs = log_softmax(logits, 2);
    log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2)
        .neg()
}
