//! The split-view attack over the wire (issue #27): a cheating center (a real gRPC server
//! on loopback in front of an honest aggregator, `mekong_e2e::cheating_center`) and one
//! colluding lab try to read one real lab's update.
//!
//! Five labs: the target `lab-t` and `lab-a` are real participants (real training), and so
//! are `lab-b1` and `lab-b2`; `lab-c` is a wire-level lab whose secrets the center knows (it
//! colludes). In attempt 0 the center shows `lab-b1` and `lab-b2` a survivor list without
//! the target and keeps their signatures from the aggregator; then it hands them an unmask
//! request over that list, signed by both and by the colluder, and keeps what they reveal:
//! their shares of the target's mask key. The honest aggregator meanwhile unmasks the
//! round over the target, `lab-a` and the colluder, whose reveals carry the shares of the
//! target's self-mask seed. With both secrets the center strips every mask from the
//! target's masked input.
//!
//! With a plan that tolerates no colluder (a strict majority, 3 of 5) the center reads the
//! target's update. With the default (`max_colluding = 1`, threshold 4) the center plays
//! both lists itself (the first group's signatures kept from the aggregator too), so only
//! the labs' own checks stand in its way: every lab refuses to reveal over a list with
//! three signatures, the center holds only the colluder's share of each secret, and the
//! round completes honestly in the next attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use burn::prelude::Device;
use fedclient::participant;
use fedcore::FederationPlan;
use fedcore::round::{SecureMessage, SecureStep};
use fedcore::secagg::crypto::{AgreementSecret, Identity};
use fedcore::secagg::mask::{MaskSign, apply_many};
use fedcore::secagg::messages::{
    ConsistencySignature, Index, KeyRoster, ShareDelivery, SurvivorList, UnmaskRequest,
};
use fedcore::secagg::protocol::{CONSISTENCY_TAG, consistency_message};
use fedcore::secagg::shamir::{Share, combine};
use mekong_e2e::cheating_center::{CheatingCenter, Deviation};
use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};
use mekong_proto::secure::{decode_words, message_from_wire, step_from_wire, step_to_wire};
use mekong_proto::v1 as pb;
use zeroize::Zeroizing;

/// Roster order is protocol order: lab-t is index 1, lab-c index 5.
const LABS: [(&str, &str); 5] = [
    ("lab-t", "lo"),
    ("lab-a", "km"),
    ("lab-b1", "th"),
    ("lab-b2", "vi"),
    ("lab-c", "xx"),
];
const TARGET: Index = 1;
const COLLUDER: Index = 5;
/// Shown the list on which the target survived: they reveal its self-mask seed.
const FIRST_GROUP: [&str; 2] = ["lab-t", "lab-a"];
/// Shown the list on which the target dropped: they reveal its mask key.
const SECOND_GROUP: [&str; 2] = ["lab-b1", "lab-b2"];

fn plan(max_colluding: usize) -> FederationPlan {
    let identities: Vec<_> = (0..5).map(|i| test_identity(i as u8)).collect();
    let roster: Vec<(&str, _)> = LABS.iter().map(|(n, _)| *n).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 120_000, 3_000);
    plan.secure_aggregation.max_colluding = max_colluding;
    plan
}

/// What the center learns along the way.
#[derive(Default)]
struct Loot {
    /// From the first train task: session, attempt-0 context parts.
    session: Option<[u8; 32]>,
    global_hash: Option<String>,
    roster: Option<KeyRoster>,
    /// The colluder's deliveries of encrypted shares, by attempt.
    colluder_delivery: Option<ShareDelivery>,
    /// Each group's signatures on its list, by index (group 0: first, 1: second).
    signatures: [BTreeMap<Index, [u8; 64]>; 2],
    /// Labs whose reveal the center kept.
    revealed: std::collections::BTreeSet<String>,
    /// The highest attempt the aggregator has started.
    attempt: u32,
}

struct Attack {
    plan: FederationPlan,
    loot: Mutex<Loot>,
    /// Whether the center also plays the first list itself (keeping the first group's
    /// signatures from the aggregator and handing it its own unmask request) instead of
    /// letting the honest aggregator unmask it.
    fabricate_first: bool,
}

/// A lab's protocol index: its place on the roster.
fn index_of(name: &str) -> Index {
    LABS.iter().position(|(n, _)| *n == name).unwrap() as Index + 1
}

impl Attack {
    fn cfg(&self) -> fedcore::secagg::protocol::RoundConfig {
        let loot = self.loot.lock().unwrap();
        let spec = &self.plan.secure_aggregation;
        let len = self.plan.initial_adapter().b_manifest().len();
        let vector_len = self.plan.update_encoding(len, 1).unwrap().vector_len();
        spec.round_config(
            &self.plan.fingerprint(),
            5,
            loot.session.unwrap(),
            1,
            0,
            loot.global_hash.as_deref().unwrap(),
            vector_len,
            3,
        )
    }

    /// The survivor list group `g` is shown: everyone (first), everyone but the target
    /// (second).
    fn list(g: usize) -> Vec<Index> {
        (1..=5).filter(|&i| g == 0 || i != TARGET).collect()
    }

    /// The group the center plays `name` in, if any.
    fn group_of(&self, name: &str) -> Option<usize> {
        if SECOND_GROUP.contains(&name) {
            Some(1)
        } else if self.fabricate_first && FIRST_GROUP.contains(&name) {
            Some(0)
        } else {
            None
        }
    }

    /// What the center shows a lab instead of the aggregator's answer.
    fn tamper_task(&self, name: &str, answer: &mut pb::FetchTaskResponse) {
        if let Some(pb::fetch_task_response::Task::Train(t)) = &answer.task {
            let mut loot = self.loot.lock().unwrap();
            if let Some(s) = &t.secure {
                loot.attempt = loot.attempt.max(s.attempt);
                if let (0, Some(g)) = (s.attempt, &t.global_adapter) {
                    loot.session = Some(s.session.as_slice().try_into().unwrap());
                    loot.global_hash = Some(g.content_hash.clone());
                }
            }
            return;
        }
        if let Some(pb::fetch_task_response::Task::SecureStep(step)) = &answer.task
            && step.attempt == 0
        {
            let owned = step_from_wire(step.step.as_ref()).unwrap();
            let mut loot = self.loot.lock().unwrap();
            match owned.as_step() {
                SecureStep::ShareKeys(roster) => loot.roster = Some(roster.clone()),
                SecureStep::MaskedInput(delivery) if name == "lab-c" => {
                    loot.colluder_delivery = Some(delivery.clone());
                }
                _ => {}
            }
        }
        let Some(g) = self.group_of(name) else {
            return;
        };
        // A played group, during attempt 0 only.
        let (signed, all_signed, revealed, attempt) = {
            let loot = self.loot.lock().unwrap();
            (
                loot.signatures[g].contains_key(&index_of(name)),
                loot.signatures[g].len() == SECOND_GROUP.len(),
                loot.revealed.contains(name),
                loot.attempt,
            )
        };
        if attempt > 0 || revealed {
            return;
        }
        let is_consistency = matches!(
            &answer.task,
            Some(pb::fetch_task_response::Task::SecureStep(pb::SecureStep {
                attempt: 0,
                step: Some(pb::secure_step::Step::Consistency(_)),
                ..
            }))
        );
        if !signed {
            if is_consistency
                && let Some(pb::fetch_task_response::Task::SecureStep(step)) = &mut answer.task
            {
                step.step = Some(step_to_wire(&SecureStep::Consistency(&SurvivorList {
                    survivors: Self::list(g),
                })));
            }
            return;
        }
        // Signed: wait for the rest of the group, then the unmask request over its list.
        answer.task = Some(if all_signed {
            let mut step = pb::SecureStep {
                round: 1,
                attempt: 0,
                deadline_in_ms: 3_000,
                step: None,
            };
            self.unmask_request(g, &mut step);
            pb::fetch_task_response::Task::SecureStep(step)
        } else {
            pb::fetch_task_response::Task::Wait(pb::Wait {
                reason: "the center is waiting for the rest of the group".into(),
                retry_after_ms: 100,
            })
        });
    }

    /// Makes `step` group `g`'s unmask request, signed by the group and the colluder.
    fn unmask_request(&self, g: usize, step: &mut pb::SecureStep) {
        let signatures = self.loot.lock().unwrap().signatures[g].clone();
        let cfg = self.cfg();
        let list = Self::list(g);
        // The colluder signs the second list too.
        let colluder = Identity::from_seed(*test_identity(4).bytes());
        let mut all: Vec<ConsistencySignature> = signatures
            .into_iter()
            .map(|(from, signature)| ConsistencySignature { from, signature })
            .collect();
        all.push(ConsistencySignature {
            from: COLLUDER,
            signature: colluder.sign(CONSISTENCY_TAG, &consistency_message(&cfg, &list)),
        });
        step.step = Some(step_to_wire(&SecureStep::Unmask(&UnmaskRequest {
            survivors: list,
            signatures: all,
        })));
    }

    /// Keeps a played group's consistency signatures and reveals from the aggregator.
    fn tamper_secure(&self, name: &str, req: &pb::SecureAggregateRequest) -> bool {
        let Some(g) = self.group_of(name) else {
            return true;
        };
        if req.attempt != 0 {
            return true;
        }
        match message_from_wire(req.message.as_ref()).unwrap() {
            SecureMessage::Consistency(sig) => {
                self.loot.lock().unwrap().signatures[g].insert(sig.from, sig.signature);
                false
            }
            SecureMessage::Unmask(_) => {
                self.loot.lock().unwrap().revealed.insert(name.to_string());
                false
            }
            _ => true,
        }
    }
}

/// Runs the attack under a plan tolerating `max_colluding` colluders. Returns the center's
/// reconstruction of the target's update (or why it failed), the target's real update, and
/// the round's record.
async fn run_attack(
    max_colluding: usize,
    fabricate_first: bool,
) -> (Result<Vec<f64>, String>, Vec<f32>, u32, usize, usize) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(max_colluding);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let attack = Arc::new(Attack {
        plan: plan.clone(),
        loot: Mutex::default(),
        fabricate_first,
    });
    let (a1, a2) = (attack.clone(), attack.clone());
    let center = CheatingCenter::start(
        &server.url(),
        Deviation {
            task: Some(Box::new(move |name, answer| a1.tamper_task(name, answer))),
            secure: Some(Box::new(move |name, req| a2.tamper_secure(name, req))),
            ..Default::default()
        },
    )
    .await;
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for (i, (name, code)) in LABS.iter().enumerate().take(4) {
        let mut options = participant_options(&center.url(), name, code);
        options.trust_aggregator_plan = false;
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        options.state_dir = Some(dir.path().join(name));
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    let colluder = WireLab::join(
        &center.url(),
        plan.clone(),
        "lab-c",
        *test_identity(4).bytes(),
    )
    .await;
    let len = plan.initial_adapter().b_manifest().len();
    let colluder = tokio::spawn(colluder.run(vec![0.01; len], 100, WireBehaviour::Honest));
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    colluder.await.unwrap();
    server.finished().await;
    let status = server.status();
    let record = &status.history[0];
    let attempt = record.secure.as_ref().expect("securely aggregated").attempt;
    let contributors = record.contributors.len();

    let target_update = recorder
        .round(1)
        .into_iter()
        .find(|u| u.name == "lab-t")
        .unwrap()
        .values;
    let stolen = reconstruct(&attack, &center, &plan);
    let revealed_to_center = attack.loot.lock().unwrap().revealed.len();
    (
        stolen,
        target_update,
        attempt,
        contributors,
        revealed_to_center,
    )
}

/// The center's reconstruction of the target's update from what it collected in attempt 0.
fn reconstruct(
    attack: &Attack,
    center: &CheatingCenter,
    plan: &FederationPlan,
) -> Result<Vec<f64>, String> {
    let cfg = attack.cfg();
    let t = cfg.threshold;
    let received = center.received();
    let loot = attack.loot.lock().unwrap();
    let roster = loot.roster.as_ref().ok_or("no key roster")?;
    let public = |i: Index| roster.keys.iter().find(|k| k.from == i).unwrap();
    // Every share of the target's secrets revealed in attempt 0, forwarded or kept.
    let mut seed_shares = Vec::new();
    let mut key_shares = Vec::new();
    for req in received.secure_messages.iter().filter(|r| r.attempt == 0) {
        if let SecureMessage::Unmask(r) = message_from_wire(req.message.as_ref()).unwrap() {
            for s in r.self_mask_shares.iter().filter(|s| s.owner == TARGET) {
                seed_shares.push(Share {
                    x: s.x,
                    y: s.y.clone(),
                });
            }
            for s in r.key_shares.iter().filter(|s| s.owner == TARGET) {
                key_shares.push(Share {
                    x: s.x,
                    y: s.y.clone(),
                });
            }
        }
    }
    // The colluder's own share of the target's mask key, from the share it was sent.
    let delivery = loot
        .colluder_delivery
        .as_ref()
        .ok_or("no delivery to the colluder")?;
    let mut c_secret = *test_identity(4).bytes();
    c_secret[0] = c_secret[0].wrapping_add(1); // how the wire lab draws its first attempt
    let sealed = delivery.shares.iter().find(|s| s.from == TARGET).unwrap();
    let plain = AgreementSecret::from_bytes(c_secret)
        .open_shares(
            &public(TARGET).c_public,
            &cfg.context,
            TARGET,
            COLLUDER,
            &sealed.ciphertext,
        )
        .map_err(|e| e.to_string())?;
    key_shares.push(Share {
        x: plain[0],
        y: plain[1..33].to_vec(),
    });
    seed_shares.push(Share {
        x: plain[33],
        y: plain[34..].to_vec(),
    });
    // The colluder's reveal may also have passed through: one share per x.
    let mut seen = std::collections::BTreeSet::new();
    seed_shares.retain(|s| seen.insert(s.x));
    let seed = combine(&seed_shares, t)
        .map_err(|e| format!("self-mask seed from {} shares: {e}", seed_shares.len()))?;
    let key = combine(&key_shares, t)
        .map_err(|e| format!("mask key from {} shares: {e}", key_shares.len()))?;
    let id = &received.ids["lab-t"];
    let masked = received
        .masked
        .get(&(id.clone(), 1, 0))
        .ok_or("no masked input of the target")?;
    let mut words = decode_words(masked).map_err(|e| e.to_string())?;
    let peers: Vec<(Index, [u8; 32])> = (2..=5).map(|v| (v, public(v).s_public)).collect();
    let secret = AgreementSecret::from_bytes(key.try_into().unwrap());
    let mut masks = vec![(
        Zeroizing::new(<[u8; 16]>::try_from(seed.as_slice()).unwrap()),
        MaskSign::Subtract,
    )];
    // The target (index 1) added every pair mask with a larger index: take them off.
    for pair in secret
        .pairwise_mask_seeds(&peers, &cfg.context, TARGET)
        .map_err(|e| e.to_string())?
    {
        masks.push((pair, MaskSign::Subtract));
    }
    apply_many(&masks, &mut words);
    let len = plan.initial_adapter().b_manifest().len();
    let decoded = plan
        .secure_aggregation
        .encoding(len)
        .unwrap()
        .decode_sum(&words, 1)
        .map_err(|e| e.to_string())?;
    // One summand: the "mean" is the target's update itself.
    Ok(decoded.mean_update)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_strict_majority_the_center_and_one_colluder_read_a_lab_over_the_wire() {
    // The honest aggregator unmasks the first list; the center plays the second.
    let (stolen, update, _, _, revealed) = run_attack(0, false).await;
    assert_eq!(
        revealed, 2,
        "both labs shown the second list revealed to the center"
    );
    let stolen = stolen.expect("the split-view attack works when no colluder is tolerated");
    assert_eq!(stolen.len(), update.len());
    let mut close = 0;
    for (s, u) in stolen.iter().zip(&update) {
        if (s - *u as f64).abs() < 1e-4 {
            close += 1;
        }
    }
    assert_eq!(
        close,
        update.len(),
        "the center read lab-t's update value by value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_collusion_threshold_the_split_view_yields_nothing() {
    // The center plays both lists itself, so nothing but the labs' own checks stands in
    // its way: each list carries two honest signatures and the colluder's, 3 < 4.
    let (stolen, _, attempt, contributors, revealed) = run_attack(1, true).await;
    assert_eq!(
        revealed, 0,
        "no lab revealed anything to the center's lists"
    );
    let err = stolen.expect_err("the attack must fail at t = 4");
    // All the center holds of the target's secrets is the colluder's own share of each.
    assert_eq!(
        err,
        "self-mask seed from 1 shares: 1 shares given, 4 are needed"
    );
    // The round still completed, honestly, in a later attempt.
    assert!(attempt >= 1, "attempt {attempt}");
    assert_eq!(contributors, 5);
}
