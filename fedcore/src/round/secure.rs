//! Secure aggregation inside a round: the coordinator's side of one attempt of the protocol
//! in [`crate::secagg`], with the messages it broadcasts kept so a participant that asks
//! again (a retried long-poll) gets the same answer.
//!
//! An attempt starts when the round opens. Stage 0 (advertise keys) is answered by each lab
//! once it has trained, so it runs under the round's deadline; every later stage has its own
//! deadline (`secure_aggregation.stage_timeout_ms`). A stage closes as soon as everyone it
//! waits for has answered, or at its deadline with whoever has; whoever is missing has
//! dropped. An attempt that falls below the threshold fails cleanly and the coordinator
//! starts the next one.

use std::collections::{BTreeMap, BTreeSet};

use crate::secagg::crypto::IdentityKeys;
use crate::secagg::messages::{
    AdvertiseKeys, ConsistencySignature, Index, KeyRoster, ShareDelivery, ShareKeys, SurvivorList,
    UnmaskRequest, UnmaskResponse,
};
use crate::secagg::protocol::{ProtocolError, RoundConfig, Stage};
use crate::secagg::server::ServerSession;
use crate::secagg::spec::UpdateEncoding;

/// A participant's message for one of the stages that are not streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureMessage {
    Advertise(AdvertiseKeys),
    ShareKeys(ShareKeys),
    Consistency(ConsistencySignature),
    Unmask(UnmaskResponse),
}

impl SecureMessage {
    /// Who the message says it is from.
    pub fn from(&self) -> Index {
        match self {
            SecureMessage::Advertise(m) => m.from,
            SecureMessage::ShareKeys(m) => m.from,
            SecureMessage::Consistency(m) => m.from,
            SecureMessage::Unmask(m) => m.from,
        }
    }
}

/// What the server asks of one participant in the current stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureStep<'a> {
    /// Check the advertised keys and send encrypted shares.
    ShareKeys(&'a KeyRoster),
    /// Decrypt the shares and stream the masked update.
    MaskedInput(&'a ShareDelivery),
    /// Sign the survivor list.
    Consistency(&'a SurvivorList),
    /// Check the signatures and reveal shares.
    Unmask(&'a UnmaskRequest),
}

impl SecureStep<'_> {
    /// The protocol stage this step belongs to.
    pub fn stage(&self) -> Stage {
        match self {
            SecureStep::ShareKeys(_) => Stage::ShareKeys,
            SecureStep::MaskedInput(_) => Stage::MaskedInput,
            SecureStep::Consistency(_) => Stage::ConsistencyCheck,
            SecureStep::Unmask(_) => Stage::Unmask,
        }
    }
}

/// How an attempt stands after being driven forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    Pending,
    Finished {
        sum: Vec<u32>,
        survivors: Vec<Index>,
    },
    Failed(ProtocolError),
}

/// One attempt of secure aggregation for the open round.
pub(crate) struct SecureRound {
    pub attempt: u32,
    pub server: ServerSession,
    pub encoding: UpdateEncoding,
    /// Cohort members' indices: who stage 0 waits for.
    cohort: BTreeSet<Index>,
    /// Members that left the federation during this attempt: no stage waits for them, as
    /// if they had dropped (see `leave.rs`).
    departed: BTreeSet<Index>,
    /// Deadline of the current stage once keys are advertised (stage 0 runs under the
    /// round's deadline).
    pub stage_deadline_ms: Option<u64>,
    roster: Option<KeyRoster>,
    deliveries: BTreeMap<Index, ShareDelivery>,
    survivors: Option<SurvivorList>,
    unmask: Option<UnmaskRequest>,
}

impl std::fmt::Debug for SecureRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureRound")
            .field("attempt", &self.attempt)
            .field("stage", &self.server.stage())
            .field("stage_deadline_ms", &self.stage_deadline_ms)
            .finish_non_exhaustive()
    }
}

impl SecureRound {
    pub fn new(
        cfg: RoundConfig,
        identities: IdentityKeys,
        encoding: UpdateEncoding,
        cohort: BTreeSet<Index>,
        attempt: u32,
    ) -> Result<Self, ProtocolError> {
        Ok(SecureRound {
            attempt,
            server: ServerSession::new(cfg, identities)?,
            encoding,
            cohort,
            departed: BTreeSet::new(),
            stage_deadline_ms: None,
            roster: None,
            deliveries: BTreeMap::new(),
            survivors: None,
            unmask: None,
        })
    }

    pub fn stage(&self) -> Stage {
        self.server.stage()
    }

    /// An attempt resumed after a restart from its server session (consistency check or
    /// unmask): the broadcasts are rebuilt from the session, exactly as first sent (the
    /// key roster, the survivor list and, in the unmask stage, the signatures it closed
    /// with), and the current stage gets a fresh deadline.
    pub fn resume(
        server: ServerSession,
        encoding: UpdateEncoding,
        cohort: BTreeSet<Index>,
        attempt: u32,
        stage_deadline_ms: u64,
    ) -> Self {
        let roster = KeyRoster {
            keys: server.advertisements().cloned().collect(),
        };
        let survivors = SurvivorList {
            survivors: server.survivors().to_vec(),
        };
        let unmask = (server.stage() == Stage::Unmask).then(|| UnmaskRequest {
            survivors: server.survivors().to_vec(),
            signatures: server.signatures().cloned().collect(),
        });
        SecureRound {
            attempt,
            server,
            encoding,
            cohort,
            departed: BTreeSet::new(),
            stage_deadline_ms: Some(stage_deadline_ms),
            roster: Some(roster),
            deliveries: BTreeMap::new(),
            survivors: Some(survivors),
            unmask,
        }
    }

    /// Whether `who` still has to answer the current stage.
    pub fn awaits(&self, who: Index) -> bool {
        let expected = match self.stage() {
            Stage::AdvertiseKeys => self.cohort.contains(&who),
            _ => self.server.expected().contains(&who),
        };
        expected && !self.server.answered(who) && !self.departed.contains(&who)
    }

    /// Participant `who` left the federation: from now on it is treated as having dropped
    /// out of the stage under way (nothing waits for it, and it is refused upstream).
    pub fn depart(&mut self, who: Index) {
        self.departed.insert(who);
    }

    /// How many the current stage still waits for.
    pub fn awaited(&self) -> usize {
        match self.stage() {
            Stage::AdvertiseKeys => self.cohort.iter().filter(|i| self.awaits(**i)).count(),
            _ => self
                .server
                .expected()
                .iter()
                .filter(|i| self.awaits(**i))
                .count(),
        }
    }

    /// What `who` should do now, if anything.
    pub fn step_for(&self, who: Index) -> Option<SecureStep<'_>> {
        if !self.awaits(who) {
            return None;
        }
        match self.stage() {
            Stage::ShareKeys => self.roster.as_ref().map(SecureStep::ShareKeys),
            Stage::MaskedInput => self.deliveries.get(&who).map(SecureStep::MaskedInput),
            Stage::ConsistencyCheck => self.survivors.as_ref().map(SecureStep::Consistency),
            Stage::Unmask => self.unmask.as_ref().map(SecureStep::Unmask),
            Stage::AdvertiseKeys | Stage::Done => None,
        }
    }

    /// Feeds a non-streamed message, after checking it comes from the caller.
    pub fn receive(&mut self, who: Index, msg: SecureMessage) -> Result<(), ProtocolError> {
        if msg.from() != who {
            return Err(ProtocolError::Misaddressed {
                from: msg.from(),
                to: 0,
                me: who,
            });
        }
        if matches!(msg, SecureMessage::Advertise(_)) && !self.cohort.contains(&who) {
            return Err(ProtocolError::UnknownParticipant(who));
        }
        match msg {
            SecureMessage::Advertise(m) => self.server.receive_advertise(m),
            SecureMessage::ShareKeys(m) => self.server.receive_shares(m),
            SecureMessage::Consistency(m) => self.server.receive_signature(m),
            SecureMessage::Unmask(m) => self.server.receive_unmask(m),
        }
    }

    /// Advertisements received so far.
    pub fn advertised(&self) -> usize {
        if self.stage() == Stage::AdvertiseKeys {
            self.server.answers()
        } else {
            self.roster.as_ref().map_or(0, |r| r.keys.len())
        }
    }

    /// Whether every participant the current stage waits for has answered (members that
    /// left are not waited for).
    fn complete(&self) -> bool {
        match self.stage() {
            Stage::Done => false,
            _ => self.awaited() == 0,
        }
    }

    /// Closes stages while they are complete, or the current one when `deadline_passed`.
    /// The round's result comes out of the last stage.
    pub fn advance(
        &mut self,
        now_ms: u64,
        stage_timeout_ms: u64,
        deadline_passed: bool,
    ) -> Progress {
        let mut force = deadline_passed;
        loop {
            if !(force || self.complete()) {
                return Progress::Pending;
            }
            force = false;
            let stage = self.stage();
            let closed = match stage {
                Stage::AdvertiseKeys => self.server.close_advertise().map(|r| {
                    self.roster = Some(r);
                }),
                Stage::ShareKeys => self.server.close_share_keys().map(|d| {
                    self.deliveries = d.into_iter().map(|d| (d.to, d)).collect();
                }),
                Stage::MaskedInput => self.server.close_masked().map(|l| {
                    self.deliveries.clear();
                    self.survivors = Some(l);
                }),
                Stage::ConsistencyCheck => self.server.close_consistency().map(|r| {
                    self.unmask = Some(r);
                }),
                Stage::Unmask => {
                    // All shares may be in while a broken masked stream is still being
                    // taken back; wait for it until the deadline.
                    if !deadline_passed && self.server.partial_inputs().next().is_some() {
                        return Progress::Pending;
                    }
                    return match self.server.finish() {
                        Ok((sum, survivors)) => Progress::Finished { sum, survivors },
                        Err(e) => Progress::Failed(e),
                    };
                }
                Stage::Done => return Progress::Pending,
            };
            if let Err(e) = closed {
                return Progress::Failed(e);
            }
            self.stage_deadline_ms = Some(now_ms + stage_timeout_ms);
        }
    }
}
