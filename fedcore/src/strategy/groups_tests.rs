//! `group_b`: A averaged over every lab, each group's B over that group's labs, from the one
//! weighted sum; a group absent from a round keeps its B; configuration refused by name.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::groups::{GROUP_WEIGHT_SLOT, GroupSpec};
use super::tests::{config, lora, random_matrix, shapes, train};
use super::*;
use crate::adapter::Matrix;
use crate::aggregate::WeightedSum;
use crate::plan::FederationPlan;

fn members(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(lab, group)| (lab.to_string(), group.to_string()))
        .collect()
}

fn group_spec(pairs: &[(&str, &str)], min_labs: usize) -> StrategySpec {
    StrategySpec {
        mode: AggregationMode::GroupB,
        groups: Some(GroupSpec {
            members: members(pairs),
            min_labs,
        }),
        ..Default::default()
    }
}

const LABS: [(&str, &str); 6] = [
    ("lo-1", "lo"),
    ("lo-2", "lo"),
    ("lo-3", "lo"),
    ("vi-1", "vi"),
    ("vi-2", "vi"),
    ("km-1", "km"),
];

/// A `group_b` global with a random, distinct B per group.
fn grouped_global(rng: &mut ChaCha8Rng, sh: &[ModuleShape]) -> GlobalModel {
    let adapter = LoraAdapter::init_ffa(config(2), sh, 3);
    let groups: Vec<String> = ["km", "lo", "vi"].iter().map(|g| g.to_string()).collect();
    let mut global = GlobalModel::with_groups(adapter, &groups);
    for bs in global.group_b.values_mut() {
        for b in bs.values_mut() {
            *b = random_matrix(rng, b.rows(), b.cols(), 0.3);
        }
    }
    global
}

fn weighted_mean<'a>(items: impl Iterator<Item = (&'a Matrix, u64)>) -> Vec<f64> {
    let mut acc: Vec<f64> = Vec::new();
    let mut total = 0f64;
    for (m, w) in items {
        if acc.is_empty() {
            acc = vec![0.0; m.data().len()];
        }
        for (a, v) in acc.iter_mut().zip(m.data()) {
            *a += w as f64 * f64::from(*v);
        }
        total += w as f64;
    }
    acc.iter().map(|a| a / total).collect()
}

fn assert_close(got: &Matrix, want: &[f64], what: &str) {
    for (g, w) in got.data().iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-5, "{what}: {g} against {w}");
    }
}

#[test]
fn a_is_averaged_over_every_lab_and_b_within_each_group() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let sh = shapes(4, 5);
    let s = Strategy::new(group_spec(&LABS, 1), &lora(2), &sh, false).unwrap();
    let global = grouped_global(&mut rng, &sh);
    let state = ServerState::default();
    assert_eq!(s.trains(&state), TrainedFactors { a: true, b: true });
    let layout = s.upload_layout(&global, &state);
    assert_eq!(layout.groups(), vec!["km", "lo", "vi"]);

    // The Khmer lab sits this round out: its group's B must not move.
    let present = &LABS[..5];
    let weights = [30u64, 20, 10, 7, 3];
    let mut sum = WeightedSum::new(layout.len());
    let mut trained = Vec::new();
    for ((name, group), w) in present.iter().zip(weights) {
        let download = s.download(&global, name, None).unwrap();
        // A lab starts from the global A and its own group's B.
        for (module, m) in download.modules() {
            assert_eq!(m.a, global.adapter.module(module).unwrap().a);
            assert_eq!(m.b, global.group_b[*group][module]);
        }
        let t = train(&mut rng, &download, TrainedFactors { a: true, b: true });
        let upload = s.upload(&layout, name, &download, &t).unwrap();
        // Its upload fills its own group's slots and a 1 at its group; zeros elsewhere.
        for (slot, kind) in layout.slots() {
            let values = &upload[slot.offset..slot.offset + slot.numel()];
            match kind {
                SlotKind::GroupB { group: g, .. } if g != group => {
                    assert!(values.iter().all(|v| *v == 0.0), "{}", slot.name)
                }
                SlotKind::GroupB { .. } => assert!(values.iter().any(|v| *v != 0.0)),
                SlotKind::GroupWeight => {
                    assert_eq!(slot.name, GROUP_WEIGHT_SLOT);
                    let want: Vec<f32> = ["km", "lo", "vi"]
                        .iter()
                        .map(|g| if g == group { 1.0 } else { 0.0 })
                        .collect();
                    assert_eq!(values, want.as_slice());
                }
                _ => {}
            }
        }
        sum.add(w, &upload).unwrap();
        trained.push((t, *group, w));
    }
    let out = s
        .aggregate(
            &global,
            &state,
            &AggregatedUpload::from_weighted_sum(&sum).unwrap(),
        )
        .unwrap();
    for (module, _) in global.adapter.modules() {
        let a = weighted_mean(
            trained
                .iter()
                .map(|(t, _, w)| (&t.module(module).unwrap().a, *w)),
        );
        assert_close(&out.global.adapter.module(module).unwrap().a, &a, "A");
        for group in ["lo", "vi"] {
            let b = weighted_mean(
                trained
                    .iter()
                    .filter(|(_, g, _)| *g == group)
                    .map(|(t, _, w)| (&t.module(module).unwrap().b, *w)),
            );
            assert_close(&out.global.group_b[group][module], &b, group);
        }
        assert_eq!(
            out.global.group_b["km"][module],
            global.group_b["km"][module]
        );
        // The global adapter's B is the mean of every present lab's B.
        let all = weighted_mean(
            trained
                .iter()
                .map(|(t, _, w)| (&t.module(module).unwrap().b, *w)),
        );
        assert_close(
            &out.global.adapter.module(module).unwrap().b,
            &all,
            "blended B",
        );
    }
    // What a lab uses afterwards is the new A with its group's new B.
    let lo = out.global.for_group("lo").unwrap();
    let (name, _) = &global.adapter.modules()[0];
    assert_eq!(lo.module(name).unwrap().b, out.global.group_b["lo"][name]);
    assert_eq!(
        lo.module(name).unwrap().a,
        out.global.adapter.module(name).unwrap().a
    );
}

#[test]
fn a_grouped_global_keeps_its_groups_in_every_form() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let sh = shapes(3, 4);
    let g = grouped_global(&mut rng, &sh);
    assert_ne!(g.content_hash(), g.adapter.content_hash());
    assert_eq!(g.manifest().len(), g.flatten().len());
    let mut copy = g.clone();
    for bs in copy.group_b.values_mut() {
        for b in bs.values_mut() {
            *b = Matrix::zeros(b.rows(), b.cols());
        }
    }
    copy.unflatten(&g.flatten()).unwrap();
    assert_eq!(copy, g);
    let back =
        global::decode_stored(&global::encode_stored(&g), g.adapter.config().clone()).unwrap();
    assert_eq!(back, g);
    let dir = tempfile::tempdir().unwrap();
    global::write_dir(dir.path(), &g).unwrap();
    assert!(
        dir.path()
            .join("groups/lo/adapter_model.safetensors")
            .exists()
    );
    assert_eq!(global::read_dir(dir.path()).unwrap(), g);
    // A changed group B is a different model.
    let mut other = g.clone();
    let b = other
        .group_b
        .get_mut("vi")
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    b.data_mut()[0] += 1.0;
    assert_ne!(other.content_hash(), g.content_hash());
}

#[test]
fn a_lab_outside_every_group_cannot_download_or_upload() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let sh = shapes(3, 4);
    let s = Strategy::new(group_spec(&LABS, 1), &lora(2), &sh, false).unwrap();
    let global = grouped_global(&mut rng, &sh);
    let err = s
        .download(&global, "stranger", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stranger"), "{err}");
    let layout = s.upload_layout(&global, &ServerState::default());
    let a = s.download(&global, "lo-1", None).unwrap();
    let err = s
        .upload(&layout, "stranger", &a, &a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("group"), "{err}");
}

#[test]
fn group_configuration_is_refused_by_name() {
    let sh = shapes(3, 4);
    let check = |spec: StrategySpec, secure: bool| {
        Strategy::new(spec, &lora(2), &sh, secure)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let missing = check(mode_only(AggregationMode::GroupB), false);
    assert!(missing.contains("strategy.groups"), "{missing}");
    let mut stray = group_spec(&LABS, 1);
    stray.mode = AggregationMode::FedSaLora;
    assert!(check(stray, false).contains("only read with mode = \"group_b\""));
    let small = check(group_spec(&LABS, 3), false);
    assert!(
        small.contains("\"km\"") && small.contains("1 lab"),
        "{small}"
    );
    let bad_name = check(group_spec(&[("a", "l o")], 1), false);
    assert!(bad_name.contains("strategy.groups.members.a"), "{bad_name}");
    // With secure aggregation a group of one would be its lab's update in the clear.
    let secure = check(group_spec(&LABS, 1), true);
    assert!(secure.contains("min_labs"), "{secure}");
    let mut fedadam = group_spec(&[("a", "x"), ("b", "x")], 2);
    fedadam.optimizer = ServerOptimizerSpec::FedAdam(AdaptiveSpec::default());
    assert!(check(fedadam, false).contains("strategy.optimizer"));
    assert_eq!(check(group_spec(&[("a", "x"), ("b", "x")], 2), true), "");
}

#[test]
fn the_plan_checks_groups_against_the_roster_and_the_colluders() {
    let names = ["lo-1", "lo-2", "lo-3"];
    let mut plan = FederationPlan {
        privacy: Default::default(),
        federation: "test".into(),
        model: crate::plan::ModelSpec::tiny(),
        lora: crate::plan::LoraSpec::default(),
        training: crate::plan::TrainingSpec::default(),
        rounds: crate::plan::RoundSpec {
            participants: 3,
            min_updates: 3,
            ..Default::default()
        },
        roster: names
            .iter()
            .enumerate()
            .map(|(i, n)| crate::roster::RosterEntry {
                name: n.to_string(),
                public_key: hex::encode(
                    crate::secagg::crypto::Identity::from_seed([i as u8 + 1; 32]).public(),
                ),
            })
            .collect(),
        secure_aggregation: Default::default(),
        strategy: group_spec(&[("lo-1", "lo"), ("lo-2", "lo"), ("lo-3", "lo")], 3),
    };
    plan.validate().unwrap();
    assert_eq!(
        plan.initial_model().group_b.keys().collect::<Vec<_>>(),
        vec!["lo"]
    );
    // Two colluders: a group of three would show the center one honest lab's B.
    plan.secure_aggregation.max_colluding = 2;
    let err = plan.validate().unwrap_err().to_string();
    assert!(
        err.contains("min_labs") && err.contains("at least 4"),
        "{err}"
    );
    plan.secure_aggregation.max_colluding = 1;
    plan.strategy = group_spec(&[("lo-1", "lo"), ("lo-2", "lo"), ("xx", "lo")], 3);
    let err = plan.validate().unwrap_err().to_string();
    assert!(err.contains("lo-3") && err.contains("in no group"), "{err}");
}

fn mode_only(mode: AggregationMode) -> StrategySpec {
    StrategySpec {
        mode,
        ..Default::default()
    }
}
