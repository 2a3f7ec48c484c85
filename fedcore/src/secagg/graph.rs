//! Who shares keys and masks with whom in one round: the complete graph (Bonawitz et al.
//! 2017) or a pseudo-random k-regular Harary graph (SecAgg+, Bell et al., CCS 2020).
//!
//! With the complete graph every participant shares its secrets with, and masks against,
//! every other one: O(n) agreements, masks and shares per participant and O(n²) in all. With
//! a k-regular graph each participant deals only with its k neighbours, so a round costs
//! O(k) per participant whatever n is; Bell et al. show that k = O(log n) keeps both privacy
//! and dropout tolerance when the graph is random and unknown to the adversary before the
//! round (here: fixed by the pinned plan and the round number alone, so that a server
//! restarting attempts cannot draw graph after graph until its colluders surround a target).
//!
//! # Specification (version 2)
//!
//! Version 1 seeded the graph from the session and the context round (round and attempt),
//! which the server picks; version 2 seeds it from the plan and the round alone.
//!
//! Every participant and the server compute the same graph from public data only: the
//! round's graph seed and the roster (the sorted, deduplicated participant indices of
//! the round, from provisioning, *not* the members that advertised keys, so that dropouts
//! cannot move the edges).
//!
//! For [`Neighbourhood::Complete`], or [`Neighbourhood::Harary`] with `degree >= n - 1`
//! (n = roster size), every two members are neighbours. Otherwise, with k = `degree`:
//!
//! 1. Seed: the round's 32-byte graph seed (`RoundConfig::graph_seed`, made by
//!    [`crate::secagg::spec::graph_seed`] from the plan's fingerprint and the round, never
//!    from the session or the attempt, which the server picks), then
//!    `seed = SHA-256("mekong/secagg/v1/graph" ‖ graph seed)`.
//! 2. Stream: the ChaCha20 keystream (20 rounds, RFC 8439 block function) with key = `seed`,
//!    nonce = 12 zero bytes and block counter starting at 0 (identical to the original
//!    64-bit-nonce ChaCha20 with a zero nonce, and to `rand_chacha::ChaCha20Rng::from_seed`).
//!    It is read as consecutive little-endian u64 words: word `i` is keystream bytes
//!    `8i .. 8i + 8`.
//! 3. Permutation: start from the roster in ascending order, `a[0..n]`. For `i` from
//!    `n - 1` down to `1`: draw `j` uniformly from `0..=i` by rejection (take the next word
//!    `w`; if `w >= 2^64 - (2^64 mod (i + 1))` discard it and take another; otherwise
//!    `j = w mod (i + 1)`), then swap `a[i]` and `a[j]` (Fisher–Yates, Durstenfeld's order).
//!    Position `p` of the graph ring holds `a[p]`.
//! 4. Edges (Harary's H(k, n) on the ring of positions `0..n`): positions `p` and
//!    `(p ± d) mod n` are neighbours for `1 <= d <= floor(k / 2)`; for odd k (then n must be
//!    even) also `p` and `(p + n / 2) mod n`.
//!
//! Odd k with odd n (and k < n - 1) is refused with [`ProtocolError::OddDegree`]: no
//! k-regular graph on an odd number of vertices exists for odd k (the degree sum k·n would
//! be odd), and Harary's almost-regular variant would give one participant an extra
//! neighbour, which the other participants could not tell apart from a server's lie. An
//! even k works for every n.
//!
//! A member's *neighbourhood* is its neighbours and itself (k + 1 members): the participants
//! that hold shares of its secrets and the ones it masks against.

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::secagg::messages::Index;
use crate::secagg::protocol::{Neighbourhood, ProtocolError};

/// Domain separator of the graph seed (see the module docs).
const GRAPH_DOMAIN: &[u8] = b"mekong/secagg/v1/graph";

/// The neighbourhood graph of one round over its roster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// Members in ring order (for the complete graph: ascending).
    order: Vec<Index>,
    /// Each member's position in `order`.
    position: BTreeMap<Index, usize>,
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Complete,
    /// Neighbours within `half` ring steps on each side, plus the opposite member when
    /// `opposite` (odd degree, even n).
    Harary {
        half: usize,
        opposite: bool,
    },
}

impl Graph {
    /// The graph of the round with graph seed `seed` over `roster` (any order; duplicates
    /// are ignored). Refuses an odd degree on an odd roster (see the module docs).
    pub fn new(
        neighbourhood: Neighbourhood,
        seed: &[u8; 32],
        roster: &[Index],
    ) -> Result<Self, ProtocolError> {
        let mut members = roster.to_vec();
        members.sort_unstable();
        members.dedup();
        let n = members.len();
        let shape = match neighbourhood {
            Neighbourhood::Complete => Shape::Complete,
            Neighbourhood::Harary { degree } if degree + 1 >= n => Shape::Complete,
            Neighbourhood::Harary { degree } => {
                if degree % 2 == 1 && n % 2 == 1 {
                    return Err(ProtocolError::OddDegree { degree, members: n });
                }
                Shape::Harary {
                    half: degree / 2,
                    opposite: degree % 2 == 1,
                }
            }
        };
        let order = match shape {
            Shape::Complete => members,
            Shape::Harary { .. } => permutation(seed, members),
        };
        let position = order.iter().enumerate().map(|(p, &m)| (m, p)).collect();
        Ok(Graph {
            order,
            position,
            shape,
        })
    }

    /// Whether every two members are neighbours.
    pub fn is_complete(&self) -> bool {
        self.shape == Shape::Complete
    }

    /// The members in ring order (ascending for the complete graph).
    pub fn ring(&self) -> &[Index] {
        &self.order
    }

    /// Whether `u` is in the roster.
    pub fn contains(&self, u: Index) -> bool {
        self.position.contains_key(&u)
    }

    /// Every member's number of neighbours (the graph is regular).
    pub fn degree(&self) -> usize {
        let n = self.order.len();
        match self.shape {
            Shape::Complete => n.saturating_sub(1),
            Shape::Harary { half, opposite } => 2 * half + usize::from(opposite),
        }
    }

    /// Whether `u` and `v` are distinct members joined by an edge.
    pub fn are_neighbours(&self, u: Index, v: Index) -> bool {
        let (Some(&pu), Some(&pv)) = (self.position.get(&u), self.position.get(&v)) else {
            return false;
        };
        if pu == pv {
            return false;
        }
        match self.shape {
            Shape::Complete => true,
            Shape::Harary { half, opposite } => {
                let n = self.order.len();
                let d = (pv + n - pu) % n;
                d <= half || n - d <= half || (opposite && 2 * d == n)
            }
        }
    }

    /// Whether `v` is in `u`'s neighbourhood: `u` itself or one of its neighbours.
    pub fn in_neighbourhood(&self, u: Index, v: Index) -> bool {
        (u == v && self.contains(u)) || self.are_neighbours(u, v)
    }

    /// `u`'s neighbours in ascending order (empty for a non-member).
    pub fn neighbours(&self, u: Index) -> Vec<Index> {
        let Some(&p) = self.position.get(&u) else {
            return Vec::new();
        };
        let n = self.order.len();
        let mut out: Vec<Index> = match self.shape {
            Shape::Complete => self.order.iter().copied().filter(|&v| v != u).collect(),
            Shape::Harary { half, opposite } => {
                let mut v: Vec<Index> = (1..=half)
                    .flat_map(|d| [self.order[(p + d) % n], self.order[(p + n - d) % n]])
                    .collect();
                if opposite {
                    v.push(self.order[(p + n / 2) % n]);
                }
                v
            }
        };
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The ring order of a sparse graph: `members` (ascending) shuffled by the keyed
/// Fisher–Yates of the module docs.
fn permutation(graph_seed: &[u8; 32], mut members: Vec<Index>) -> Vec<Index> {
    let mut h = Sha256::new();
    h.update(GRAPH_DOMAIN);
    h.update(graph_seed);
    let seed: [u8; 32] = h.finalize().into();
    let mut rng = ChaCha20Rng::from_seed(seed);
    for i in (1..members.len()).rev() {
        let bound = i as u64 + 1;
        // 2^64 mod bound: the words at or above 2^64 - rem would bias the draw; redraw them.
        let rem = (u64::MAX % bound + 1) % bound;
        let j = loop {
            let w = rng.next_u64();
            if w <= u64::MAX - rem {
                break w % bound;
            }
        };
        members.swap(i, j as usize);
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round's graph seed, as the plan with fingerprint "ab" derives it.
    fn ctx(round: u64) -> [u8; 32] {
        crate::secagg::spec::graph_seed("ab", round)
    }

    fn roster(n: u32) -> Vec<Index> {
        (1..=n).collect()
    }

    #[test]
    fn harary_graphs_are_regular_symmetric_and_deterministic() {
        for n in 3..60u32 {
            for degree in 2..n as usize + 2 {
                let g = match Graph::new(Neighbourhood::Harary { degree }, &ctx(1), &roster(n)) {
                    Ok(g) => g,
                    Err(e) => {
                        assert!(degree % 2 == 1 && n % 2 == 1 && degree + 1 < n as usize);
                        assert_eq!(
                            e,
                            ProtocolError::OddDegree {
                                degree,
                                members: n as usize
                            }
                        );
                        continue;
                    }
                };
                let k = degree.min(n as usize - 1);
                assert_eq!(g.degree(), k);
                assert_eq!(g.is_complete(), k == n as usize - 1);
                for u in 1..=n {
                    let nb = g.neighbours(u);
                    assert_eq!(nb.len(), k, "n {n} degree {degree} member {u}");
                    assert!(!nb.contains(&u));
                    for v in 1..=n {
                        assert_eq!(g.are_neighbours(u, v), nb.contains(&v));
                        assert_eq!(g.are_neighbours(u, v), g.are_neighbours(v, u));
                    }
                }
                // The same inputs, in any order and with duplicates, give the same graph.
                let mut shuffled = roster(n);
                shuffled.reverse();
                shuffled.push(1);
                let again =
                    Graph::new(Neighbourhood::Harary { degree }, &ctx(1), &shuffled).unwrap();
                assert_eq!(again, g);
            }
        }
    }

    #[test]
    fn rounds_and_plans_draw_different_graphs() {
        let g = |c: [u8; 32]| {
            Graph::new(Neighbourhood::Harary { degree: 4 }, &c, &roster(40))
                .unwrap()
                .ring()
                .to_vec()
        };
        let base = g(ctx(1));
        assert_ne!(base, g(ctx(2)));
        assert_ne!(base, g(crate::secagg::spec::graph_seed("cd", 1)));
        let mut sorted = base.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, roster(40));
        assert_ne!(base, roster(40));
    }

    #[test]
    fn complete_graph_joins_everyone_and_ignores_the_seed() {
        for neighbourhood in [
            Neighbourhood::Complete,
            Neighbourhood::Harary { degree: 9 },
            Neighbourhood::Harary { degree: 100 },
        ] {
            let g = Graph::new(neighbourhood, &ctx(1), &roster(10)).unwrap();
            assert!(g.is_complete());
            assert_eq!(g.ring(), &roster(10)[..]);
            assert_eq!(g.neighbours(3), vec![1, 2, 4, 5, 6, 7, 8, 9, 10]);
            assert!(!g.are_neighbours(3, 3));
            assert!(g.in_neighbourhood(3, 3));
            assert!(!g.are_neighbours(3, 11));
            assert!(!g.in_neighbourhood(11, 11));
        }
    }

    /// Known answer computed independently with Python (`hashlib` for SHA-256 and the
    /// `cryptography` package's ChaCha20 for the stream), following the module docs only:
    ///
    /// ```text
    /// seed = sha256(b"mekong/secagg/v1/graph" + bytes([4]) * 32).digest()
    /// ks = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(32000))
    /// words = iter(int.from_bytes(ks[8 * i:8 * i + 8], "little") for i in range(4000))
    /// a = list(range(1, 21))
    /// for i in range(19, 0, -1):
    ///     rem = (1 << 64) % (i + 1)
    ///     w = next(words)
    ///     while w >= (1 << 64) - rem: w = next(words)
    ///     j = w % (i + 1); a[i], a[j] = a[j], a[i]
    /// ```
    #[test]
    fn ring_order_matches_an_independent_implementation() {
        let g = Graph::new(Neighbourhood::Harary { degree: 4 }, &[4; 32], &roster(20)).unwrap();
        assert_eq!(g.ring(), &KNOWN_RING_N20[..]);
    }

    const KNOWN_RING_N20: [Index; 20] = [
        10, 11, 13, 8, 7, 9, 20, 18, 12, 19, 17, 3, 2, 5, 6, 1, 14, 16, 15, 4,
    ];
}
