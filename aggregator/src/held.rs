//! Masked inputs whose stream broke before its last chunk, held so that the participant can
//! resume instead of sending everything again.
//!
//! What a broken stream folded stays in the running sum, and its undo logs (one [`Spool`]
//! per stream it took) are kept here under the participant and attempt. A new stream from
//! the same participant for the same attempt takes them back and goes on from the first
//! word not folded (`MaskedReceived` tells the participant where that is). Whatever is
//! still held when the masked-input stage closes was never completed: it is replayed out of
//! the sum (the participant counts as dropped), exactly as a broken stream used to be at
//! once.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::spool::Spool;

/// Which attempt's masked input, from whom (the participant's secret id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct MaskedKey {
    pub token: String,
    pub round: u64,
    pub attempt: u32,
}

/// One participant's folded but uncommitted masked input.
#[derive(Default)]
pub(crate) struct Held {
    /// Its index in the attempt (known once a chunk was folded).
    pub index: Option<fedcore::secagg::messages::Index>,
    /// The undo logs of its streams, in order.
    pub spools: Vec<Spool>,
    /// SHA-256 of every word folded so far, in order, across its streams: checked against
    /// the participant's whole-vector hash on the last chunk.
    pub hasher: Sha256,
}

impl Held {
    /// Records words that were folded and logged.
    pub fn hash(&mut self, words_le: &[u8]) {
        self.hasher.update(words_le);
    }

    /// The hash of everything folded so far.
    pub fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }

    /// Words folded over all its streams.
    pub fn words(&self) -> usize {
        self.spools.iter().map(Spool::len).sum()
    }
}

/// The held inputs of the open attempt.
#[derive(Default)]
pub(crate) struct HeldInputs(Mutex<BTreeMap<MaskedKey, Held>>);

impl HeldInputs {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<MaskedKey, Held>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether nothing is held (the common case: no stream broke).
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Takes what `key` left when its last stream broke, to go on with it.
    pub fn take(&self, key: &MaskedKey) -> Option<Held> {
        self.map().remove(key)
    }

    /// Keeps what a broken stream folded.
    pub fn hold(&self, key: MaskedKey, held: Held) {
        self.map().insert(key, held);
    }

    /// Takes every held input for which `keep` says no.
    pub fn drain_unless(&self, mut keep: impl FnMut(&MaskedKey) -> bool) -> Vec<(MaskedKey, Held)> {
        let mut map = self.map();
        let gone: Vec<MaskedKey> = map.keys().filter(|k| !keep(k)).cloned().collect();
        gone.into_iter()
            .filter_map(|k| map.remove(&k).map(|h| (k, h)))
            .collect()
    }
}
