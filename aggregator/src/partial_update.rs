//! Plaintext updates whose `SubmitUpdateStream` broke before its last chunk, held so that
//! the participant can resume instead of sending everything again (secure aggregation off:
//! the aggregator sees plaintext updates anyway, and buffers a streamed one until it is
//! complete).
//!
//! At most one partial update per participant is held, and only for the round that is
//! open: a new stream drops those of rounds that closed. What all of them hold together is
//! capped (`limits.held_partial_update_bytes`): past the cap a broken stream's bytes are
//! dropped, and its participant sends again from byte 0 (`UpdateReceived` says 0).

use std::collections::BTreeMap;
use std::sync::Mutex;

use mekong_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// The received prefix of one streamed update.
pub(crate) struct PartialUpdate {
    /// The stream's header (the request without its payload).
    pub header: pb::SubmitUpdateRequest,
    /// The values received so far, in order.
    pub values: Vec<u8>,
    /// SHA-256 of `values`, updated as chunks arrive.
    hasher: Sha256,
}

impl PartialUpdate {
    pub fn new(header: pb::SubmitUpdateRequest) -> Self {
        PartialUpdate {
            header,
            values: Vec::new(),
            hasher: Sha256::new(),
        }
    }

    /// Appends one checked chunk.
    pub fn extend(&mut self, values: &[u8]) {
        self.values.extend_from_slice(values);
        self.hasher.update(values);
    }

    /// SHA-256 of everything received.
    pub fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }

    /// Whether a resumed stream's header names the same update: same round, layout, base
    /// adapter and sample weight.
    pub fn same_update(&self, header: &pb::SubmitUpdateRequest) -> bool {
        let h = &self.header;
        h.round == header.round
            && h.layout_hash == header.layout_hash
            && h.base_adapter_hash == header.base_adapter_hash
            && h.num_samples == header.num_samples
    }
}

/// The held partial updates, by participant id, at most `cap` bytes of values in all.
pub(crate) struct PartialUpdates {
    held: Mutex<BTreeMap<String, PartialUpdate>>,
    cap: usize,
}

/// Why a broken stream's bytes were not held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OverCap {
    /// Bytes the others hold.
    pub held: usize,
    pub cap: usize,
}

impl PartialUpdates {
    pub fn new(cap: usize) -> Self {
        PartialUpdates {
            held: Mutex::new(BTreeMap::new()),
            cap,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PartialUpdate>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops what is held for rounds other than `open_round` (everything when none is open).
    pub fn keep_round(&self, open_round: Option<u64>) {
        self.map().retain(|_, p| Some(p.header.round) == open_round);
    }

    /// Takes what `token`'s broken stream left, to go on with it.
    pub fn take(&self, token: &str) -> Option<PartialUpdate> {
        self.map().remove(token)
    }

    /// Keeps what a broken stream received (nothing when it received nothing), unless
    /// holding it would pass the cap: then it is dropped, and the answer says so.
    pub fn hold(&self, token: String, partial: PartialUpdate) -> Result<(), OverCap> {
        if partial.values.is_empty() {
            return Ok(());
        }
        let mut map = self.map();
        map.remove(&token);
        let held: usize = map.values().map(|p| p.values.len()).sum();
        if held + partial.values.len() > self.cap {
            return Err(OverCap {
                held,
                cap: self.cap,
            });
        }
        map.insert(token, partial);
        Ok(())
    }

    /// Bytes held of `token`'s update for `round`.
    pub fn held_bytes(&self, token: &str, round: u64) -> usize {
        self.map()
            .get(token)
            .filter(|p| p.header.round == round)
            .map_or(0, |p| p.values.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(round: u64) -> pb::SubmitUpdateRequest {
        pb::SubmitUpdateRequest {
            participant_id: "t".into(),
            round,
            layout_hash: "l".into(),
            base_adapter_hash: "b".into(),
            num_samples: 3,
            payload: None,
            metrics: None,
        }
    }

    #[test]
    fn held_updates_are_per_participant_and_round_and_hash_what_they_hold() {
        let held = PartialUpdates::new(1 << 20);
        let mut p = PartialUpdate::new(header(2));
        p.extend(&[1, 2, 3, 4]);
        p.extend(&[5, 6, 7, 8]);
        assert_eq!(
            p.digest(),
            <[u8; 32]>::from(Sha256::digest([1, 2, 3, 4, 5, 6, 7, 8]))
        );
        assert!(p.same_update(&header(2)));
        let mut other = header(2);
        other.num_samples = 4;
        assert!(!p.same_update(&other));
        held.hold("t".into(), p).unwrap();
        held.hold("u".into(), PartialUpdate::new(header(2)))
            .unwrap();
        assert_eq!(held.held_bytes("t", 2), 8);
        assert_eq!(held.held_bytes("t", 3), 0);
        assert_eq!(held.held_bytes("u", 2), 0, "an empty prefix is not held");
        held.keep_round(Some(3));
        assert_eq!(
            held.held_bytes("t", 2),
            0,
            "a closed round's prefix is dropped"
        );
        assert!(held.take("t").is_none());
    }

    #[test]
    fn what_is_held_in_all_stays_within_the_cap() {
        let held = PartialUpdates::new(10);
        let prefix = |n: usize| {
            let mut p = PartialUpdate::new(header(2));
            p.extend(&vec![1; n]);
            p
        };
        held.hold("a".into(), prefix(6)).unwrap();
        assert_eq!(
            held.hold("b".into(), prefix(5)),
            Err(OverCap { held: 6, cap: 10 })
        );
        assert_eq!(held.held_bytes("b", 2), 0, "dropped, not held");
        held.hold("b".into(), prefix(4)).unwrap();
        // A participant's new prefix replaces its old one, not adds to it.
        held.hold("a".into(), prefix(6)).unwrap();
        assert_eq!(held.held_bytes("a", 2) + held.held_bytes("b", 2), 10);
    }
}
