//! Where a secure-aggregation round spends its CPU time, stage by stage: every participant
//! and the server run one after the other on one thread, so each figure is the CPU time of
//! that step summed over all parties (docs/benchmarks.md, "where the time goes").
//!
//! Run: `cargo run --release -p fedcore --example secagg_stages -- [n] [t] [degree] [words]`
//! (defaults: 50 participants, t = 26, complete graph (degree 0), 100 000 words).

use std::collections::BTreeMap;
use std::time::Instant;

use fedcore::secagg::crypto::SessionContext;
use fedcore::secagg::protocol::{Neighbourhood, ProtocolError, RoundConfig};
use fedcore::secagg::simulation::SimulatedRound;

const STEPS: [&str; 10] = [
    "participants: advertise keys",
    "server: check advertisements",
    "participants: share keys",
    "server: relay shares",
    "participants: masked input",
    "server: fold masked inputs",
    "participants: consistency check",
    "server: check signatures",
    "participants: unmask",
    "server: reconstruct and unmask",
];

fn main() -> Result<(), ProtocolError> {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (n, t, degree, words) = (arg(1, 50) as u32, arg(2, 26), arg(3, 0), arg(4, 100_000));
    let cfg = RoundConfig {
        context: SessionContext {
            session: [1; 32],
            round: 1,
        },
        threshold: t,
        min_peers: 3,
        vector_len: words,
        model_hash: [0; 32],
        neighbourhood: match degree {
            0 => Neighbourhood::Complete,
            degree => Neighbourhood::Harary { degree },
        },
        graph_seed: [3; 32],
        groups: None,
    };
    let inputs: BTreeMap<u32, Vec<u32>> = (1..=n).map(|i| (i, vec![i; words])).collect();
    let rounds = 5;
    let mut spent = [0f64; STEPS.len()];
    for _ in 0..rounds {
        let mut f = SimulatedRound::new(cfg.clone(), inputs.clone(), 7)?;
        let ids: Vec<u32> = f.parts.keys().copied().collect();
        let mut clock = Instant::now();
        let mut lap = |step: usize| {
            spent[step] += clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
        };
        let mut ads = Vec::new();
        for i in &ids {
            ads.push(f.parts.get_mut(i).expect("listed").advertise()?);
        }
        lap(0);
        for a in ads {
            f.server.receive_advertise(a)?;
        }
        let roster = f.server.close_advertise()?;
        lap(1);
        let mut shares = Vec::new();
        for i in &ids {
            shares.push(f.parts.get_mut(i).expect("listed").share_keys(&roster)?);
        }
        lap(2);
        for s in shares {
            f.server.receive_shares(s)?;
        }
        let deliveries = f.server.close_share_keys()?;
        lap(3);
        let mut masked = Vec::new();
        for d in &deliveries {
            let p = f.parts.get_mut(&d.to).expect("listed");
            masked.push(p.masked_input(d, &f.inputs[&d.to])?);
        }
        lap(4);
        for m in masked {
            f.server.receive_masked(m)?;
        }
        let list = f.server.close_masked()?;
        lap(5);
        let mut signatures = Vec::new();
        for i in &ids {
            signatures.push(f.parts.get_mut(i).expect("listed").consistency(&list)?);
        }
        lap(6);
        for s in signatures {
            f.server.receive_signature(s)?;
        }
        let request = f.server.close_consistency()?;
        lap(7);
        let mut responses = Vec::new();
        for i in &ids {
            responses.push(f.parts.get_mut(i).expect("listed").unmask(&request)?);
        }
        lap(8);
        for r in responses {
            f.server.receive_unmask(r)?;
        }
        f.server.finish()?;
        lap(9);
    }
    let mut total = 0.0;
    for (step, ms) in STEPS.iter().zip(spent) {
        println!("{step:>32} {:8.1} ms", ms / rounds as f64);
        total += ms / rounds as f64;
    }
    println!("{:>32} {total:8.1} ms", "total (one thread)");
    println!(
        "{:>32} {}",
        "masks drawn by",
        fedcore::secagg::mask::kernel_name()
    );
    Ok(())
}
