//! A whole secure-aggregation round in one process: every participant and the server, with
//! chosen dropouts before any stage. It serves simulation studies (how many dropouts a
//! configuration survives), the protocol's tests and its benchmarks. Identities and
//! randomness are derived from a seed, so it is for simulation only, never for deployment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::secagg::crypto::{Identity, IdentityKeys};
use crate::secagg::messages::Index;
use crate::secagg::participant::{ParticipantSession, RoundRandomness};
use crate::secagg::protocol::{ProtocolError, RoundConfig};
use crate::secagg::server::ServerSession;

/// `drops[k]`: participants that stop answering before stage k (0 = advertise keys,
/// 1 = share keys, 2 = masked input, 3 = consistency check, 4 = unmask).
pub type Dropouts = [BTreeSet<Index>; 5];

/// The deterministic identity seed of simulated participant `i`.
pub fn identity_seed(i: Index) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..4].copy_from_slice(&i.to_le_bytes());
    s[31] = 0xaa;
    s
}

/// Participants 1..=n, their inputs, and the server, ready for one round.
pub struct SimulatedRound {
    pub cfg: RoundConfig,
    pub server: ServerSession,
    pub parts: BTreeMap<Index, ParticipantSession>,
    pub inputs: BTreeMap<Index, Vec<u32>>,
}

impl SimulatedRound {
    /// One participant per entry of `inputs` (indices must be 1..=n), with round randomness
    /// drawn from `seed`.
    pub fn new(
        cfg: RoundConfig,
        inputs: BTreeMap<Index, Vec<u32>>,
        seed: u64,
    ) -> Result<Self, ProtocolError> {
        let identities: BTreeMap<Index, [u8; 32]> = inputs
            .keys()
            .map(|&i| (i, Identity::from_seed(identity_seed(i)).public()))
            .collect();
        // Decoded once and shared: each simulated lab and the server decode the roster's
        // long-term keys before the round starts, as the real ones do when they validate
        // the plan's roster.
        let identities = IdentityKeys::decode(&identities)?;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut parts = BTreeMap::new();
        for &i in inputs.keys() {
            let r = RoundRandomness::draw(&mut rng);
            let p =
                ParticipantSession::new(cfg.clone(), i, identity_seed(i), identities.clone(), r)?;
            parts.insert(i, p);
        }
        Ok(SimulatedRound {
            server: ServerSession::new(cfg.clone(), identities)?,
            cfg,
            parts,
            inputs,
        })
    }

    /// Runs every stage, honest participants answering unless dropped. Participants work in
    /// parallel across the machine's cores, as they would on their own machines; the server
    /// takes each message as it arrives. Returns the server's unmasked sum and the survivors
    /// (U3), or the first refusal.
    pub fn run(&mut self, drops: &Dropouts) -> Result<(Vec<u32>, Vec<Index>), ProtocolError> {
        let mut alive: BTreeSet<Index> = self.parts.keys().copied().collect();
        let server = &mut self.server;
        let inputs = &self.inputs;

        alive.retain(|i| !drops[0].contains(i));
        let work = select(&mut self.parts, &alive, |_| Some(()));
        par_stage(work, |p, _| p.advertise(), |m| server.receive_advertise(m))?;
        let roster = server.close_advertise()?;

        alive.retain(|i| !drops[1].contains(i));
        let work = select(&mut self.parts, &alive, |_| Some(&roster));
        par_stage(work, |p, r| p.share_keys(r), |m| server.receive_shares(m))?;
        let deliveries: BTreeMap<Index, _> = server
            .close_share_keys()?
            .into_iter()
            .map(|d| (d.to, d))
            .collect();

        alive.retain(|i| !drops[2].contains(i));
        let work = select(&mut self.parts, &alive, |i| {
            deliveries.get(&i).map(|d| (d, &inputs[&i]))
        });
        par_stage(
            work,
            |p, (d, input)| p.masked_input(d, input),
            |m| server.receive_masked(m),
        )?;
        let survivors = server.close_masked()?;

        alive.retain(|i| !drops[3].contains(i));
        let work = select(&mut self.parts, &alive, |i| {
            survivors.survivors.contains(&i).then_some(&survivors)
        });
        par_stage(
            work,
            |p, l| p.consistency(l),
            |m| server.receive_signature(m),
        )?;
        let request = server.close_consistency()?;

        alive.retain(|i| !drops[4].contains(i));
        let work = select(&mut self.parts, &alive, |i| {
            request
                .signatures
                .iter()
                .any(|s| s.from == i)
                .then_some(&request)
        });
        par_stage(work, |p, r| p.unmask(r), |m| server.receive_unmask(m))?;
        server.finish()
    }

    /// `Σ inputs mod 2^32` over `who`, computed directly.
    pub fn plaintext_sum(&self, who: &[Index]) -> Vec<u32> {
        let mut sum = vec![0u32; self.cfg.vector_len];
        for i in who {
            for (s, x) in sum.iter_mut().zip(&self.inputs[i]) {
                *s = s.wrapping_add(*x);
            }
        }
        sum
    }
}

/// The alive participants for which `extra` gives this stage's input.
fn select<'a, X>(
    parts: &'a mut BTreeMap<Index, ParticipantSession>,
    alive: &BTreeSet<Index>,
    extra: impl Fn(Index) -> Option<X>,
) -> Vec<(&'a mut ParticipantSession, X)> {
    parts
        .iter_mut()
        .filter(|(i, _)| alive.contains(i))
        .filter_map(|(i, p)| extra(*i).map(|x| (p, x)))
        .collect()
}

/// Runs `step` for every participant on all cores and hands each reply to `sink` on the
/// calling thread as it arrives; the first error stops the stage. Workers take the next
/// participant from a shared queue, so a core slowed down by other work (the server's, on
/// the calling thread) does not leave the other idle at the end of the stage.
fn par_stage<X: Send, M: Send>(
    work: Vec<(&mut ParticipantSession, X)>,
    step: impl Fn(&mut ParticipantSession, &X) -> Result<M, ProtocolError> + Sync,
    mut sink: impl FnMut(M) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(work.len())
        .max(1);
    let queue = Mutex::new(work.into_iter());
    let (queue, step) = (&queue, &step);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..threads {
            let tx = tx.clone();
            scope.spawn(move || {
                // A poisoned queue means another worker panicked: stop taking work.
                while let Some((p, x)) = queue.lock().ok().and_then(|mut q| q.next()) {
                    if tx.send(step(p, &x)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for reply in rx {
            sink(reply?)?;
        }
        Ok(())
    })
}
