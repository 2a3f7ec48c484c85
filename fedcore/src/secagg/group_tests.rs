//! `group_b` sums: the sum carries one slot per group, so a survivor list in which a group
//! has one survivor (or too few) would put that lab's update in the clear. The honest
//! server refuses to propose such a list, and every lab refuses to sign one a cheating
//! server shows it.

use std::collections::{BTreeMap, BTreeSet};

use super::messages::{Index, SurvivorList};
use super::protocol::{ProtocolError, RoundConfig, SurvivorGroups};
use super::simulation::{Dropouts, SimulatedRound};
use super::tests::config;

const LEN: usize = 8;

/// Labs 1–3 are Lao, 4–6 Vietnamese; a group needs 3 survivors (one colluder tolerated).
fn grouped_config() -> RoundConfig {
    let group_of = (1..=6)
        .map(|i: Index| (i, if i <= 3 { "lo" } else { "vi" }.to_string()))
        .collect();
    RoundConfig {
        groups: Some(SurvivorGroups { group_of, min: 3 }),
        ..config(4, LEN)
    }
}

fn round(cfg: RoundConfig) -> SimulatedRound {
    let inputs = (1..=6)
        .map(|i: Index| (i, (0..LEN as u32).map(|k| 100 * i + k).collect()))
        .collect();
    SimulatedRound::new(cfg, inputs, 17).unwrap()
}

#[test]
fn a_whole_group_surviving_sums_as_usual() {
    let mut f = round(grouped_config());
    let (sum, survivors) = f.run(&Dropouts::default()).unwrap();
    assert_eq!(survivors, (1..=6).collect::<Vec<_>>());
    assert_eq!(sum, f.plaintext_sum(&survivors));
}

#[test]
fn the_server_will_not_propose_a_group_with_too_few_survivors() {
    let mut f = round(grouped_config());
    let mut drops = Dropouts::default();
    drops[2] = BTreeSet::from([5]);
    let err = f.run(&drops).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::GroupTooSmall {
            group: "vi".into(),
            survivors: 2,
            needed: 3
        }
    );
    // Without groups the same dropout is an ordinary round of five.
    let mut plain = round(config(4, LEN));
    assert!(plain.run(&drops).is_ok());
}

/// A modified server that skips its own check: every lab sends its masked input, then the
/// server shows the labs a list on which lab 4 is the only Vietnamese survivor, so that the
/// `vi` slot of the sum would be lab 4's update alone.
#[test]
fn a_lab_refuses_to_sign_a_list_that_isolates_one_lab_of_a_group() {
    let mut f = round(grouped_config());
    let roster = {
        for p in f.parts.values_mut() {
            let m = p.advertise().unwrap();
            f.server.receive_advertise(m).unwrap();
        }
        f.server.close_advertise().unwrap()
    };
    for p in f.parts.values_mut() {
        let m = p.share_keys(&roster).unwrap();
        f.server.receive_shares(m).unwrap();
    }
    let deliveries: BTreeMap<Index, _> = f
        .server
        .close_share_keys()
        .unwrap()
        .into_iter()
        .map(|d| (d.to, d))
        .collect();
    for (i, p) in f.parts.iter_mut() {
        p.masked_input(&deliveries[i], &f.inputs[i]).unwrap();
    }
    let isolating = SurvivorList {
        survivors: vec![1, 2, 3, 4],
    };
    for i in [1, 2, 3, 4] {
        let err = f
            .parts
            .get_mut(&i)
            .unwrap()
            .consistency(&isolating)
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::GroupTooSmall {
                group: "vi".into(),
                survivors: 1,
                needed: 3
            },
            "lab {i}"
        );
    }
    // The full list is signed by the same labs.
    let full = SurvivorList {
        survivors: (1..=6).collect(),
    };
    for p in f.parts.values_mut() {
        p.consistency(&full).unwrap();
    }
}
