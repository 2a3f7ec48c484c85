//! The participant's half of a securely aggregated round, sans IO: it turns a trained update
//! into the quantised vector, runs one protocol session for one attempt, and answers each
//! [`SecureStep`] the coordinator hands out. The client runtime only moves its messages.

use zeroize::Zeroizing;

use crate::plan::FederationPlan;
use crate::privacy::ddg::DistributedDiscreteGaussian;
use crate::privacy::distributed::{DdgError, SumAccounting};
use crate::round::{SecureMessage, SecureStep, SecureTrain};
use crate::secagg::messages::{AdvertiseKeys, Index, MaskedInput};
use crate::secagg::participant::{ParticipantSession, RoundRandomness};
use crate::secagg::protocol::ProtocolError;
use crate::secagg::spec::EncodedUpdate;
use crate::update::UpdateError;

impl From<DdgError> for UploadError {
    fn from(e: DdgError) -> Self {
        match e {
            DdgError::Update(e) => UploadError::Update(e),
            other => UploadError::Noise(other),
        }
    }
}

/// Why a secure upload could not start or go on.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum UploadError {
    #[error("the plan has no valid roster: {0}")]
    Plan(#[from] crate::error::ConfigError),
    #[error("the aggregator calls this participant {got}, but it is {expected} on the roster")]
    WrongIndex { got: Index, expected: Index },
    #[error("this participant ({0}) is not on the plan's roster")]
    NotOnRoster(String),
    #[error("the update cannot be encoded: {0}")]
    Update(#[from] UpdateError),
    #[error("the update cannot be noised: {0}")]
    Noise(DdgError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// What to send in answer to a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Message(SecureMessage),
    /// The masked update, to stream in chunks.
    Masked(MaskedInput),
}

/// Everything a participant needs besides the update itself; secrets come from the caller
/// (the OS in production).
pub struct UploadSecrets {
    /// The lab's long-term Ed25519 identity seed.
    pub identity_seed: Zeroizing<[u8; 32]>,
    /// Fresh per attempt.
    pub randomness: RoundRandomness,
    /// Seed of the stochastic rounding (and, under `[privacy]`, of the noise);
    /// [`rounding_seed`] derives it.
    pub rounding_seed: [u8; 32],
}

/// The seed of an update's stochastic rounding: HKDF-SHA-256 of the lab's identity secret,
/// bound to the round and the global adapter the update was trained from.
///
/// Why derived rather than drawn: the same update then rounds to the same integers in
/// every attempt of its round, so a secure attempt that restarts (a lab dropped, or the
/// aggregator crashed before unmasking) sums exactly what the first would have, and a rerun
/// with the same seeds ends with the same adapter. The server does not know the identity
/// secret, so it can neither predict nor steer the rounding; and masks, which hide the
/// update, stay fresh per attempt.
pub fn rounding_seed(identity_seed: &[u8; 32], round: u64, global_hash: &str) -> [u8; 32] {
    use hkdf::Hkdf;
    use sha2::Sha256;
    let mut info = Vec::with_capacity(8 + global_hash.len());
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(global_hash.as_bytes());
    let mut seed = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"mekong/rounding-seed/v1"), identity_seed)
        .expand(&info, &mut seed)
        .expect("32 bytes is a valid HKDF-SHA-256 output length");
    seed
}

/// One participant's secure upload for one attempt of one round.
pub struct SecureUpload {
    round: u64,
    attempt: u32,
    session_id: [u8; 32],
    session: ParticipantSession,
    /// The quantised, still unmasked update: wiped when dropped.
    words: Zeroizing<Vec<u32>>,
    encoded: EncodedSummary,
    revealed: bool,
    /// Under `[privacy]`: how the sum is accounted once its survivors are known.
    privacy: Option<SumAccounting>,
    /// The noised sum the reveal lets the center unmask.
    spent: Option<DistributedDiscreteGaussian>,
}

/// What encoding did to the update, for logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodedSummary {
    pub clipped: usize,
    pub weight: u64,
    /// Under `[privacy]`: the update's L2 norm before clipping.
    pub l2_norm: Option<f64>,
}

impl SecureUpload {
    /// Opens attempt `task.attempt` of `round` for participant `name`, whose update
    /// `delta = B_local − B_global` (upload layout) was trained from `global_hash` on
    /// `num_samples` samples; returns the session and its key advertisement.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        plan: &FederationPlan,
        name: &str,
        task: SecureTrain,
        round: u64,
        global_hash: &str,
        delta: &[f32],
        num_samples: u64,
        min_peers: usize,
        secrets: UploadSecrets,
    ) -> Result<(Self, AdvertiseKeys), UploadError> {
        let roster = plan.roster()?;
        let me = roster
            .index_of(name)
            .ok_or_else(|| UploadError::NotOnRoster(name.to_string()))?;
        if me != task.index {
            return Err(UploadError::WrongIndex {
                got: task.index,
                expected: me,
            });
        }
        let spec = &plan.secure_aggregation;
        let encoding = plan.update_encoding(delta.len(), round)?;
        let mut cfg = spec.round_config(
            &plan.fingerprint(),
            roster.len(),
            task.session,
            round,
            task.attempt,
            global_hash,
            encoding.vector_len(),
            min_peers,
        );
        // Under `group_b` this lab refuses any survivor list that would expose a group's
        // slot over too few labs (its own group's or another's).
        cfg.groups = plan.survivor_groups();
        let EncodedUpdate {
            words,
            clipped,
            weight,
            l2_norm,
        } = encoding.encode(delta, num_samples, secrets.rounding_seed)?;
        let privacy = encoding.private().map(|e| e.accounting());
        let mut session = ParticipantSession::new(
            cfg,
            me,
            *secrets.identity_seed,
            roster.identities(),
            secrets.randomness,
        )?;
        let advert = session.advertise()?;
        Ok((
            SecureUpload {
                round,
                attempt: task.attempt,
                session_id: task.session,
                session,
                words: Zeroizing::new(words),
                encoded: EncodedSummary {
                    clipped,
                    weight,
                    l2_norm,
                },
                revealed: false,
                privacy,
                spent: None,
            },
            advert,
        ))
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The session (run) this upload belongs to.
    pub fn session(&self) -> [u8; 32] {
        self.session_id
    }

    pub fn encoded(&self) -> EncodedSummary {
        self.encoded
    }

    /// Whether this session has revealed shares (and so must never run again for the same
    /// round and update).
    pub fn revealed(&self) -> bool {
        self.revealed
    }

    /// Under `[privacy]`, once shares are revealed: the noised sum they let the center
    /// unmask (its survivors known from the signed list).
    pub fn spent(&self) -> Option<&DistributedDiscreteGaussian> {
        self.spent.as_ref()
    }

    /// Answers one step; a step inconsistent with what this participant saw is refused.
    pub fn respond(&mut self, step: &SecureStep<'_>) -> Result<Reply, ProtocolError> {
        Ok(match step {
            SecureStep::ShareKeys(roster) => {
                Reply::Message(SecureMessage::ShareKeys(self.session.share_keys(roster)?))
            }
            SecureStep::MaskedInput(delivery) => {
                Reply::Masked(self.session.masked_input(delivery, &self.words)?)
            }
            SecureStep::Consistency(list) => {
                Reply::Message(SecureMessage::Consistency(self.session.consistency(list)?))
            }
            SecureStep::Unmask(request) => {
                let response = self.session.unmask(request)?;
                self.revealed = true;
                self.spent = self
                    .privacy
                    .as_ref()
                    .map(|a| a.for_summed(request.survivors.len()));
                Reply::Message(SecureMessage::Unmask(response))
            }
        })
    }
}
