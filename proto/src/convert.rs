//! Conversions between wire messages and fedcore types, in one place for both sides.

use fedcore::round::RoundWork;
use fedcore::strategy::{GlobalModel, TrainedFactors};
use fedcore::update::{UpdateError, check_values, decode_f32_le, encode_f32_le};
use thiserror::Error;

use crate::v1 as pb;

/// Why a received adapter payload was refused.
#[derive(Debug, Error)]
pub enum PayloadError {
    #[error("adapter layout {got} does not match the plan's layout {expected}")]
    Layout { got: String, expected: String },
    #[error("adapter values: {0}")]
    Values(#[from] UpdateError),
    #[error("adapter content hash {computed} does not match the announced {announced}")]
    ContentHash { computed: String, announced: String },
    #[error("the message carries no adapter")]
    Missing,
    #[error("round work: {0}")]
    Work(String),
}

/// The wire form of why a participant leaves.
pub fn leave_reason_to_wire(reason: fedcore::round::LeaveReason) -> pb::LeaveReason {
    use fedcore::round::LeaveReason as R;
    match reason {
        R::MaxRounds => pb::LeaveReason::MaxRounds,
        R::OperatorRequest => pb::LeaveReason::OperatorRequest,
        R::PrivacyBudget => pb::LeaveReason::PrivacyBudget,
        R::Unspecified => pb::LeaveReason::Unspecified,
    }
}

/// Why a participant leaves, from the wire; a value this build does not know (a newer
/// participant's) reads as unspecified rather than refusing the departure.
pub fn leave_reason_from_wire(code: i32) -> fedcore::round::LeaveReason {
    use fedcore::round::LeaveReason as R;
    match pb::LeaveReason::try_from(code) {
        Ok(pb::LeaveReason::MaxRounds) => R::MaxRounds,
        Ok(pb::LeaveReason::OperatorRequest) => R::OperatorRequest,
        Ok(pb::LeaveReason::PrivacyBudget) => R::PrivacyBudget,
        Ok(pb::LeaveReason::Unspecified) | Err(_) => R::Unspecified,
    }
}

/// A round's work as received, checked for form: [`fedcore::round::lab::StatedWork`], which
/// the lab compares with what its pinned plan gives.
pub use fedcore::round::lab::StatedWork as WireWork;

/// The wire form of a round's work under `mode`.
pub fn work_to_wire(mode: &str, work: &RoundWork<'_>) -> pb::RoundWork {
    pb::RoundWork {
        mode: mode.to_string(),
        train_a: work.trains.a,
        train_b: work.trains.b,
        rank: work.rank as u32,
        upload_layout_hash: work.layout.manifest().hash_hex(),
        upload_len: work.layout.len() as u64,
    }
}

/// Reads a round's work: every field checked for form (a 64-digit hex layout hash, a rank
/// of at least 1, at least one factor trained, a length that fits in memory). Absent means
/// an aggregator from before strategies: FFA-LoRA's B-only work at `default_rank`, with the
/// B-only layout `b_layout_hash` of `b_len` values.
pub fn work_from_wire(
    work: Option<&pb::RoundWork>,
    default_rank: usize,
    (b_layout_hash, b_len): (&str, usize),
) -> Result<WireWork, PayloadError> {
    let Some(w) = work else {
        return Ok(WireWork {
            mode: "ffa_lora".into(),
            trains: TrainedFactors { a: false, b: true },
            rank: default_rank,
            upload_layout_hash: b_layout_hash.to_string(),
            upload_len: b_len,
        });
    };
    let bad = |m: String| Err(PayloadError::Work(m));
    if w.mode.is_empty() || w.mode.len() > 32 {
        return bad(format!("mode must be 1 to 32 characters, got {:?}", w.mode));
    }
    if !(w.train_a || w.train_b) {
        return bad("trains neither A nor B".into());
    }
    if w.rank == 0 || w.rank > 1 << 16 {
        return bad(format!("rank {} must be between 1 and 65536", w.rank));
    }
    if !(w.upload_layout_hash.len() == 64
        && w.upload_layout_hash.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return bad(format!(
            "upload_layout_hash must be 64 hex digits, got {} characters",
            w.upload_layout_hash.len()
        ));
    }
    let upload_len = usize::try_from(w.upload_len)
        .ok()
        .filter(|n| (1..=crate::MAX_MESSAGE_BYTES / 4).contains(n));
    let Some(upload_len) = upload_len else {
        return bad(format!("upload_len {} is out of range", w.upload_len));
    };
    Ok(WireWork {
        mode: w.mode.clone(),
        trains: TrainedFactors {
            a: w.train_a,
            b: w.train_b,
        },
        rank: w.rank as usize,
        upload_layout_hash: w.upload_layout_hash.to_ascii_lowercase(),
        upload_len,
    })
}

/// Flattens a global model (every A then B in canonical order, then FedEx-LoRA's dense
/// corrections) into its inline wire form.
pub fn adapter_payload(global: &GlobalModel, content_hash: &str) -> pb::AdapterPayload {
    let values_f32_le = encode_f32_le(&global.flatten());
    pb::AdapterPayload {
        layout_hash: global.manifest().hash_hex(),
        content_hash: content_hash.to_string(),
        values_bytes: values_f32_le.len() as u64,
        values_f32_le,
    }
}

/// Rebuilds a global model from its wire form, using `template` (the plan's initial model)
/// for names and shapes; checks the layout hash, every value, and the content hash.
pub fn decode_adapter_payload(
    payload: Option<&pb::AdapterPayload>,
    template: &GlobalModel,
) -> Result<GlobalModel, PayloadError> {
    let payload = payload.ok_or(PayloadError::Missing)?;
    let manifest = template.manifest();
    if payload.layout_hash != manifest.hash_hex() {
        return Err(PayloadError::Layout {
            got: payload.layout_hash.clone(),
            expected: manifest.hash_hex(),
        });
    }
    let values = decode_f32_le(&payload.values_f32_le)?;
    check_values(&values, &manifest)?;
    let mut global = template.clone();
    global
        .unflatten(&values)
        .expect("length and layout were checked");
    let computed = global.content_hash();
    if computed != payload.content_hash {
        return Err(PayloadError::ContentHash {
            computed,
            announced: payload.content_hash.clone(),
        });
    }
    Ok(global)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::RoundWork {
        pb::RoundWork {
            mode: "rolora".into(),
            train_a: true,
            train_b: false,
            rank: 4,
            upload_layout_hash: "ab".repeat(32),
            upload_len: 96,
        }
    }

    #[test]
    fn round_work_is_checked_for_form_and_absent_means_ffa_lora() {
        let w = work_from_wire(Some(&good()), 8, ("00", 1)).unwrap();
        assert_eq!(w.trains, TrainedFactors { a: true, b: false });
        assert_eq!((w.rank, w.upload_len, w.mode.as_str()), (4, 96, "rolora"));
        let old = work_from_wire(None, 8, ("cd", 40)).unwrap();
        assert_eq!(old.trains, TrainedFactors { a: false, b: true });
        assert_eq!((old.rank, old.upload_len), (8, 40));
        assert_eq!(old.upload_layout_hash, "cd");
        let refused = |w: pb::RoundWork, what: &str| {
            let err = work_from_wire(Some(&w), 8, ("00", 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{err}");
        };
        refused(
            pb::RoundWork {
                train_a: false,
                ..good()
            },
            "neither A nor B",
        );
        refused(pb::RoundWork { rank: 0, ..good() }, "rank 0");
        refused(
            pb::RoundWork {
                upload_layout_hash: "ab".into(),
                ..good()
            },
            "64 hex digits",
        );
        refused(
            pb::RoundWork {
                upload_len: 0,
                ..good()
            },
            "upload_len 0",
        );
        refused(
            pb::RoundWork {
                upload_len: u64::MAX,
                ..good()
            },
            "out of range",
        );
        refused(
            pb::RoundWork {
                mode: String::new(),
                ..good()
            },
            "mode",
        );
    }
}
