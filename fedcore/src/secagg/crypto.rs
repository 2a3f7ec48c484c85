//! Key agreement, key derivation, share encryption and identity signatures for secure
//! aggregation, each bound to the session and round so nothing can be replayed elsewhere.
//!
//! # Specification (version 1)
//!
//! - Key agreement: X25519 (RFC 7748) between a participant's round secret and a peer's
//!   round public key; an all-zero (non-contributory) shared secret is refused.
//! - Derivation: HKDF-SHA256 with `ikm` = the X25519 output,
//!   `salt` = `"mekong/secagg/v1" ‖ session (32 bytes) ‖ round (u64 LE)`, and
//!   `info` = `label ‖ min(u, v) (u32 LE) ‖ max(u, v) (u32 LE)`; the label is `"mask"` for
//!   the 16-byte pairwise mask seed and `"share-key"` for the 32-byte share-encryption key.
//! - Share encryption: ChaCha20-Poly1305 under the share key, nonce = 11 zero bytes then
//!   `0` when the sender's index is the smaller one and `1` otherwise (each direction
//!   encrypts exactly one message per round), associated data =
//!   `"mekong/secagg/v1/shares" ‖ session ‖ round (u64 LE) ‖ sender (u32 LE) ‖ receiver (u32 LE)`.
//! - Signatures: Ed25519 (`verify_strict`) over `"mekong/secagg/v1/" ‖ tag ‖ 0x00 ‖ message`,
//!   the tag naming the protocol stage, so a signature from one stage is never valid in
//!   another. Many signatures at once may be checked together ([`verify_batch`]); see
//!   there for how that relates to `verify_strict`.
//!
//! Test vectors: `vectors/secagg_crypto.json`, generated independently (Python
//! `cryptography`) by `scripts/secagg_vectors.py`, whose docstring defines each field, and
//! reproduced through this API by `fedcore/tests/secagg_vectors.rs`.

use aws_lc_rs::agreement::{UnparsedPublicKey, X25519};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

const DOMAIN: &[u8] = b"mekong/secagg/v1";

/// Why a cryptographic step failed; each names the peer involved.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    #[error(
        "key agreement with participant {peer} gave a non-contributory secret (low-order public key)"
    )]
    NonContributory { peer: u32 },
    #[error("shares from participant {sender} to {receiver} failed to decrypt or authenticate")]
    Decrypt { sender: u32, receiver: u32 },
    #[error("participant {0}'s identity key is not a valid Ed25519 public key")]
    BadIdentityKey(u32),
    #[error("participant {signer}'s signature on {tag} does not verify")]
    BadSignature { signer: u32, tag: &'static str },
}

/// What binds every derived key to one protocol run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionContext {
    /// Identifies the federation run (e.g. a hash of the plan and the run's start).
    pub session: [u8; 32],
    pub round: u64,
}

impl SessionContext {
    fn salt(&self) -> Vec<u8> {
        let mut salt = Vec::with_capacity(DOMAIN.len() + 40);
        salt.extend_from_slice(DOMAIN);
        salt.extend_from_slice(&self.session);
        salt.extend_from_slice(&self.round.to_le_bytes());
        salt
    }
}

/// An X25519 secret whose bytes can be exported (to be Shamir-shared) and are wiped on drop.
///
/// The agreement is aws-lc-rs's X25519 (AWS-LC, whose x86-64 and AArch64 X25519 is
/// s2n-bignum's formally verified code), the same provider the TLS links use. Why not
/// x25519-dalek: agreements are about 40% of a complete-graph round (98 per participant over
/// 50 labs), and AWS-LC's takes about 60% of the time of the fastest dalek route (the
/// Edwards form on the AVX2 backend) on the development machine (docs/benchmarks.md).
/// Results are the RFC 7748 function bit for bit (RFC vectors and a comparison with
/// x25519-dalek's ladder in the tests); an all-zero (non-contributory) output is refused.
/// The secret's bytes are kept beside the key (zeroized on drop) so they can be
/// Shamir-shared; AWS-LC scrubs its own copy when the key is freed, and the shared secret
/// it hands back is zeroized too.
pub struct AgreementSecret {
    bytes: Zeroizing<[u8; 32]>,
    key: aws_lc_rs::agreement::PrivateKey,
}

impl AgreementSecret {
    /// The secret for 32 random bytes supplied by the caller.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let bytes = Zeroizing::new(bytes);
        let key = aws_lc_rs::agreement::PrivateKey::from_private_key(&X25519, &bytes[..])
            .expect("every 32-byte string is an X25519 private key");
        AgreementSecret { bytes, key }
    }

    /// The public key to advertise.
    pub fn public(&self) -> [u8; 32] {
        let public = self
            .key
            .compute_public_key()
            .expect("an X25519 private key always has a public key");
        public
            .as_ref()
            .try_into()
            .expect("X25519 public keys are 32 bytes")
    }

    /// The secret's bytes, for Shamir sharing; wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.bytes.clone()
    }

    /// The raw X25519 output with `peer_public` (see the type's docs), refusing an all-zero
    /// result.
    fn agree(&self, peer_public: &[u8; 32], peer: u32) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let refused = CryptoError::NonContributory { peer };
        let shared = aws_lc_rs::agreement::agree(
            &self.key,
            UnparsedPublicKey::new(&X25519, peer_public),
            refused.clone(),
            |secret: &[u8]| {
                let mut out = Zeroizing::new([0u8; 32]);
                out.copy_from_slice(secret);
                Ok(out)
            },
        )?;
        // AWS-LC already refuses a zero output; checked again so that the refusal does
        // not depend on the provider.
        if *shared == [0u8; 32] {
            return Err(refused);
        }
        Ok(shared)
    }

    /// HKDF-SHA256 of an agreement into `out` (see the module docs).
    fn derive(
        shared: &[u8; 32],
        ctx: &SessionContext,
        label: &[u8],
        me: u32,
        peer: u32,
        out: &mut [u8],
    ) {
        let mut info = Vec::with_capacity(label.len() + 8);
        info.extend_from_slice(label);
        info.extend_from_slice(&me.min(peer).to_le_bytes());
        info.extend_from_slice(&me.max(peer).to_le_bytes());
        Hkdf::<Sha256>::new(Some(&ctx.salt()), shared)
            .expand(&info, out)
            .expect("16 and 32 bytes are valid HKDF-SHA256 output lengths");
    }

    /// The 16-byte seed of the mask shared by participants `me` and `peer` (symmetric).
    pub fn pairwise_mask_seed(
        &self,
        peer_public: &[u8; 32],
        ctx: &SessionContext,
        me: u32,
        peer: u32,
    ) -> Result<Zeroizing<[u8; 16]>, CryptoError> {
        let mut seed = Zeroizing::new([0u8; 16]);
        let shared = self.agree(peer_public, peer)?;
        Self::derive(&shared, ctx, b"mask", me, peer, seed.as_mut());
        Ok(seed)
    }

    /// [`Self::pairwise_mask_seed`] with every `(peer, public key)` in `peers`, in order;
    /// on failure names the first peer refused.
    pub fn pairwise_mask_seeds(
        &self,
        peers: &[(u32, [u8; 32])],
        ctx: &SessionContext,
        me: u32,
    ) -> Result<Vec<Zeroizing<[u8; 16]>>, CryptoError> {
        peers
            .iter()
            .map(|(peer, public)| self.pairwise_mask_seed(public, ctx, me, *peer))
            .collect()
    }

    /// The key that encrypts shares between `me` and `peer`, in both directions; derive it
    /// once per peer and reuse it for sealing and opening.
    pub fn share_key(
        &self,
        peer_public: &[u8; 32],
        ctx: &SessionContext,
        me: u32,
        peer: u32,
    ) -> Result<ShareKey, CryptoError> {
        let shared = self.agree(peer_public, peer)?;
        let mut key = Zeroizing::new([0u8; 32]);
        Self::derive(&shared, ctx, b"share-key", me, peer, key.as_mut());
        let key: &[u8; 32] = &key;
        Ok(ShareKey(ChaCha20Poly1305::new(key.into())))
    }

    /// [`Self::share_key`] with every `(peer, public key)` in `peers`, in order; on failure
    /// names the first peer refused.
    pub fn share_keys(
        &self,
        peers: &[(u32, [u8; 32])],
        ctx: &SessionContext,
        me: u32,
    ) -> Result<Vec<ShareKey>, CryptoError> {
        peers
            .iter()
            .map(|(peer, public)| self.share_key(public, ctx, me, *peer))
            .collect()
    }

    /// Encrypts this participant's (`sender`) shares for `receiver`.
    pub fn seal_shares(
        &self,
        receiver_public: &[u8; 32],
        ctx: &SessionContext,
        sender: u32,
        receiver: u32,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.share_key(receiver_public, ctx, sender, receiver)?
            .seal(ctx, sender, receiver, plaintext)
    }

    /// Decrypts shares that `sender` encrypted for this participant (`receiver`).
    pub fn open_shares(
        &self,
        sender_public: &[u8; 32],
        ctx: &SessionContext,
        sender: u32,
        receiver: u32,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.share_key(sender_public, ctx, receiver, sender)?
            .open(ctx, sender, receiver, ciphertext)
    }
}

/// The AEAD key of one pair of participants (see the module docs).
pub struct ShareKey(ChaCha20Poly1305);

impl ShareKey {
    /// Encrypts shares from `sender` to `receiver`.
    pub fn seal(
        &self,
        ctx: &SessionContext,
        sender: u32,
        receiver: u32,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let aad = share_aad(ctx, sender, receiver);
        self.0
            .encrypt(
                &share_nonce(sender, receiver).into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt { sender, receiver })
    }

    /// Decrypts and authenticates shares from `sender` to `receiver`.
    pub fn open(
        &self,
        ctx: &SessionContext,
        sender: u32,
        receiver: u32,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad = share_aad(ctx, sender, receiver);
        self.0
            .decrypt(
                &share_nonce(sender, receiver).into(),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt { sender, receiver })
    }
}

fn share_nonce(sender: u32, receiver: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[11] = u8::from(sender > receiver);
    nonce
}

fn share_aad(ctx: &SessionContext, sender: u32, receiver: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + 55);
    aad.extend_from_slice(DOMAIN);
    aad.extend_from_slice(b"/shares");
    aad.extend_from_slice(&ctx.session);
    aad.extend_from_slice(&ctx.round.to_le_bytes());
    aad.extend_from_slice(&sender.to_le_bytes());
    aad.extend_from_slice(&receiver.to_le_bytes());
    aad
}

fn signed_bytes(tag: &str, message: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + tag.len() + 2 + message.len());
    m.extend_from_slice(DOMAIN);
    m.push(b'/');
    m.extend_from_slice(tag.as_bytes());
    m.push(0);
    m.extend_from_slice(message);
    m
}

/// A participant's long-term Ed25519 identity.
pub struct Identity(SigningKey);

impl Identity {
    /// The identity for a 32-byte secret seed (from provisioning).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity(SigningKey::from_bytes(&seed))
    }

    /// The public key peers and the aggregator know from provisioning.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `message` for protocol stage `tag`.
    pub fn sign(&self, tag: &str, message: &[u8]) -> [u8; 64] {
        self.0.sign(&signed_bytes(tag, message)).to_bytes()
    }
}

/// Checks that `public` is a usable identity key: a valid Ed25519 point of large order.
pub fn check_identity_key(public: &[u8; 32]) -> Result<(), CryptoError> {
    IdentityKey::from_roster_bytes(0, public).map(|_| ())
}

/// A participant's identity public key, decoded once (decompressing an Ed25519 point costs
/// about a tenth of a verification) and reused for every signature it makes. Whether it is
/// of small order is also found once, not at every batch it enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityKey {
    key: VerifyingKey,
    weak: bool,
}

impl IdentityKey {
    /// Decodes participant `signer`'s 32-byte identity key.
    pub fn from_bytes(signer: u32, public: &[u8; 32]) -> Result<Self, CryptoError> {
        VerifyingKey::from_bytes(public)
            .map(|key| IdentityKey {
                weak: key.is_weak(),
                key,
            })
            .map_err(|_| CryptoError::BadIdentityKey(signer))
    }

    /// [`Self::from_bytes`], refusing also keys of small order, as a roster must
    /// ([`check_identity_key`]).
    pub fn from_roster_bytes(signer: u32, public: &[u8; 32]) -> Result<Self, CryptoError> {
        match Self::from_bytes(signer, public) {
            Ok(key) if !key.weak => Ok(key),
            _ => Err(CryptoError::BadIdentityKey(signer)),
        }
    }
}

/// The identity keys of a federation's roster by protocol index, decoded once and shared
/// (cheaply cloned) by every session that checks signatures against them: the keys are
/// long-term, so a coordinator decodes them once per federation and a participant once when
/// it validates the plan's roster, rather than once per stage or per check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKeys(std::sync::Arc<std::collections::BTreeMap<u32, IdentityKey>>);

impl IdentityKeys {
    /// Decodes every `(index, 32-byte key)`; names the first that is not a valid Ed25519
    /// point. Keys of small order are kept (signatures under them never verify); a roster
    /// refuses them beforehand ([`IdentityKey::from_roster_bytes`]).
    pub fn decode(
        identities: &std::collections::BTreeMap<u32, [u8; 32]>,
    ) -> Result<Self, CryptoError> {
        identities
            .iter()
            .map(|(&i, public)| Ok((i, IdentityKey::from_bytes(i, public)?)))
            .collect::<Result<_, CryptoError>>()
            .map(Self::from_keys)
    }

    /// Keys already decoded.
    pub fn from_keys(keys: std::collections::BTreeMap<u32, IdentityKey>) -> Self {
        IdentityKeys(std::sync::Arc::new(keys))
    }

    /// The key of roster member `index`.
    pub fn get(&self, index: u32) -> Option<&IdentityKey> {
        self.0.get(&index)
    }

    pub fn contains(&self, index: u32) -> bool {
        self.0.contains_key(&index)
    }

    /// The roster's indices, ascending.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks `signer`'s signature on `message` for stage `tag` (strict Ed25519 verification).
pub fn verify(
    signer: u32,
    public: &[u8; 32],
    tag: &'static str,
    message: &[u8],
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    verify_with(
        signer,
        &IdentityKey::from_bytes(signer, public)?,
        tag,
        message,
        signature,
    )
}

/// [`verify`] with a key already decoded.
pub fn verify_with(
    signer: u32,
    key: &IdentityKey,
    tag: &'static str,
    message: &[u8],
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    verify_signed_bytes(signer, key, tag, &signed_bytes(tag, message), signature)
}

fn verify_signed_bytes(
    signer: u32,
    key: &IdentityKey,
    tag: &'static str,
    signed: &[u8],
    signature: &[u8; 64],
) -> Result<(), CryptoError> {
    key.key
        .verify_strict(signed, &Signature::from_bytes(signature))
        .map_err(|_| CryptoError::BadSignature { signer, tag })
}

/// One signature to check in a [`verify_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SignedItem<'a> {
    pub signer: u32,
    pub key: &'a IdentityKey,
    pub message: &'a [u8],
    pub signature: &'a [u8; 64],
}

/// Checks many signatures for stage `tag` at once; on failure names the first item (in
/// the order given) that fails strict verification.
///
/// Why: a participant checks every neighbour's advertisement and consistency signature, and
/// one multi-scalar multiplication over all of them (ed25519-dalek's `verify_batch`, with
/// random coefficients derived from a transcript of the whole batch) costs about half as
/// much per signature as checking them one by one.
///
/// How it relates to [`verify`] (`verify_strict`):
/// - Inputs that `verify_strict` rejects without looking at the equation are never put in a
///   batch: identity keys of small order, and signatures whose `R` is a non-canonical
///   encoding or one of the points of small order (compared byte for byte, no
///   decompression); non-canonical `s` makes the batch fail. All of those go to
///   `verify_strict` one by one and are refused by it.
/// - A batch accepts exactly what `verify_strict` accepts, with one exception: a signature
///   that satisfies the verification equation only up to a small-order component
///   (`[s]B − [k]A − R` of order 2, 4 or 8) can pass a batch with probability ≥ 1/8 while
///   `verify_strict` refuses it. Only the holder of the signing key can make such a
///   signature (for an honest key the torsion-free part is still a valid signature), so
///   it forges nothing: it only lets a corrupt participant be accepted by some verifiers
///   and refused by others, which it could achieve anyway by signing two different
///   messages or by sending garbage to some of them. Unforgeability for honest keys is
///   unchanged.
/// - When the batch fails, every item is checked with `verify_strict` in order and the
///   first failure is returned, so errors name the culprit just as before.
pub fn verify_batch(tag: &'static str, items: &[SignedItem<'_>]) -> Result<(), CryptoError> {
    let signed: Vec<Vec<u8>> = items.iter().map(|i| signed_bytes(tag, i.message)).collect();
    let batchable = items.len() > 1 && items.iter().all(|i| batch_safe(i.key, i.signature));
    if batchable {
        let messages: Vec<&[u8]> = signed.iter().map(Vec::as_slice).collect();
        let signatures: Vec<Signature> = items
            .iter()
            .map(|i| Signature::from_bytes(i.signature))
            .collect();
        let keys: Vec<VerifyingKey> = items.iter().map(|i| i.key.key).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            return Ok(());
        }
    }
    for (item, signed) in items.iter().zip(&signed) {
        verify_signed_bytes(item.signer, item.key, tag, signed, item.signature)?;
    }
    Ok(())
}

/// Whether a signature may go into a batch: the key is not of small order and `R` is a
/// canonical encoding of a point that is not of small order (see [`verify_batch`]).
fn batch_safe(key: &IdentityKey, signature: &[u8; 64]) -> bool {
    let r: [u8; 32] = core::array::from_fn(|i| signature[i]);
    !key.weak && canonical_y(&r) && !SMALL_ORDER_ENCODINGS.contains(&r)
}

/// Whether the y coordinate of an encoded point (the low 255 bits, little-endian) is below
/// p = 2^255 − 19, i.e. not one of the 19 values p..2^255 − 1.
fn canonical_y(encoding: &[u8; 32]) -> bool {
    let top_all_ones = encoding[1..31].iter().all(|&b| b == 0xff) && encoding[31] & 0x7f == 0x7f;
    !(top_all_ones && encoding[0] >= 0xed)
}

/// The encodings of the eight points of small order with canonical y (x's sign bit either
/// way; for the two points with x = 0 the sign bit set is the non-canonical "negative
/// zero", listed too). Checked against curve25519-dalek's `EIGHT_TORSION` in the tests.
const SMALL_ORDER_ENCODINGS: [[u8; 32]; 10] = [
    // (0, 1), the identity, and with the sign bit set.
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("0100000000000000000000000000000000000000000000000000000000000080"),
    // (0, −1), order 2, and with the sign bit set.
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
    // (±√−1, 0), order 4.
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0000000000000000000000000000000000000000000000000000000000000080"),
    // Order 8.
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
];

/// Parses 64 hex digits at compile time.
const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(s[2 * i]) << 4 | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x25519_dalek::{PublicKey, StaticSecret};

    fn ctx(round: u64) -> SessionContext {
        SessionContext {
            session: [9; 32],
            round,
        }
    }

    #[test]
    fn pairwise_seeds_are_symmetric_and_bound_to_session_round_and_pair() {
        let a = AgreementSecret::from_bytes([1; 32]);
        let b = AgreementSecret::from_bytes([2; 32]);
        let c = AgreementSecret::from_bytes([3; 32]);
        let ab = a.pairwise_mask_seed(&b.public(), &ctx(1), 0, 1).unwrap();
        let ba = b.pairwise_mask_seed(&a.public(), &ctx(1), 1, 0).unwrap();
        assert_eq!(*ab, *ba);
        assert_ne!(
            *ab,
            *a.pairwise_mask_seed(&b.public(), &ctx(2), 0, 1).unwrap()
        );
        let other_session = SessionContext {
            session: [8; 32],
            round: 1,
        };
        assert_ne!(
            *ab,
            *a.pairwise_mask_seed(&b.public(), &other_session, 0, 1)
                .unwrap()
        );
        assert_ne!(
            *ab,
            *a.pairwise_mask_seed(&c.public(), &ctx(1), 0, 1).unwrap()
        );
        assert_ne!(
            *ab,
            *a.pairwise_mask_seed(&b.public(), &ctx(1), 0, 2).unwrap()
        );
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let a = AgreementSecret::from_bytes([1; 32]);
        assert_eq!(
            a.pairwise_mask_seed(&[0; 32], &ctx(1), 0, 5).unwrap_err(),
            CryptoError::NonContributory { peer: 5 }
        );
    }

    #[test]
    fn shares_open_only_for_the_right_pair_round_and_direction() {
        let a = AgreementSecret::from_bytes([1; 32]);
        let b = AgreementSecret::from_bytes([2; 32]);
        let sealed = a
            .seal_shares(&b.public(), &ctx(3), 0, 1, b"shares")
            .unwrap();
        assert_eq!(
            &b.open_shares(&a.public(), &ctx(3), 0, 1, &sealed).unwrap()[..],
            b"shares"
        );
        // Wrong round, wrong claimed sender, reversed direction, tampering: all refused.
        assert!(b.open_shares(&a.public(), &ctx(4), 0, 1, &sealed).is_err());
        assert!(b.open_shares(&a.public(), &ctx(3), 2, 1, &sealed).is_err());
        assert!(a.open_shares(&b.public(), &ctx(3), 1, 0, &sealed).is_err());
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(
            b.open_shares(&a.public(), &ctx(3), 0, 1, &bad).unwrap_err(),
            CryptoError::Decrypt {
                sender: 0,
                receiver: 1
            }
        );
    }

    #[test]
    fn signatures_are_bound_to_stage_and_message() {
        let id = Identity::from_seed([5; 32]);
        let sig = id.sign("consistency", b"survivors");
        verify(7, &id.public(), "consistency", b"survivors", &sig).unwrap();
        assert!(verify(7, &id.public(), "advertise", b"survivors", &sig).is_err());
        assert!(verify(7, &id.public(), "consistency", b"survivorz", &sig).is_err());
        let other = Identity::from_seed([6; 32]);
        assert_eq!(
            verify(7, &other.public(), "consistency", b"survivors", &sig).unwrap_err(),
            CryptoError::BadSignature {
                signer: 7,
                tag: "consistency"
            }
        );
    }

    #[test]
    fn agreement_matches_the_montgomery_ladder_and_rfc7748() {
        // RFC 7748 §6.1: Alice's secret with Bob's public key.
        let alice = AgreementSecret::from_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob_public = hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        assert_eq!(
            *alice.agree(&bob_public, 1).unwrap(),
            hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
        // Against x25519-dalek's ladder for many secrets and honest public keys, with the
        // top bit of u set or not (it is ignored).
        for i in 0..64u8 {
            let a: [u8; 32] = core::array::from_fn(|j| (j as u8).wrapping_mul(31) ^ i);
            let b: [u8; 32] = core::array::from_fn(|j| (j as u8).wrapping_mul(17) ^ i ^ 0x5a);
            let secret = AgreementSecret::from_bytes(a);
            let mut peer = AgreementSecret::from_bytes(b).public();
            if i % 2 == 1 {
                peer[31] |= 0x80;
            }
            let ladder = StaticSecret::from(a).diffie_hellman(&PublicKey::from(peer));
            assert_eq!(&*secret.agree(&peer, 2).unwrap(), ladder.as_bytes());
        }
        // u = 2 lies on the quadratic twist: computed as RFC 7748 says, like the ladder
        // (Curve25519 is twist-secure, so nothing about the secret leaks).
        let mut twist = [0u8; 32];
        twist[0] = 2;
        let ladder = StaticSecret::from(*alice.to_bytes()).diffie_hellman(&PublicKey::from(twist));
        assert_eq!(&*alice.agree(&twist, 3).unwrap(), ladder.as_bytes());
        // Points of small order give zero, which is refused.
        for t in curve25519_dalek::constants::EIGHT_TORSION {
            let u = t.to_montgomery().to_bytes();
            assert_eq!(
                alice.agree(&u, 4).unwrap_err(),
                CryptoError::NonContributory { peer: 4 }
            );
        }
    }

    #[test]
    fn batched_agreements_equal_single_ones_and_name_the_bad_peer() {
        let a = AgreementSecret::from_bytes([1; 32]);
        let peers: Vec<(u32, [u8; 32])> = (10..20u32)
            .map(|i| (i, AgreementSecret::from_bytes([i as u8; 32]).public()))
            .collect();
        let seeds = a.pairwise_mask_seeds(&peers, &ctx(1), 3).unwrap();
        let keys = a.share_keys(&peers, &ctx(1), 3).unwrap();
        for (((peer, public), seed), key) in peers.iter().zip(&seeds).zip(&keys) {
            assert_eq!(
                **seed,
                *a.pairwise_mask_seed(public, &ctx(1), 3, *peer).unwrap()
            );
            let sealed = key.seal(&ctx(1), 3, *peer, b"x").unwrap();
            let single = a.share_key(public, &ctx(1), 3, *peer).unwrap();
            assert_eq!(&single.open(&ctx(1), 3, *peer, &sealed).unwrap()[..], b"x");
        }
        assert!(a.pairwise_mask_seeds(&[], &ctx(1), 3).unwrap().is_empty());
        // A low-order key among good ones names its owner, and only its owner.
        let mut bad = peers.clone();
        bad[4].1 = [0; 32];
        assert_eq!(
            a.pairwise_mask_seeds(&bad, &ctx(1), 3).unwrap_err(),
            CryptoError::NonContributory { peer: 14 }
        );
        bad[2].1 = [0; 32];
        bad[2].1[0] = 1;
        assert_eq!(
            a.share_keys(&bad, &ctx(1), 3).err().map(|e| e.to_string()),
            Some(CryptoError::NonContributory { peer: 12 }.to_string())
        );
    }

    #[test]
    fn small_order_encodings_are_the_eight_torsion_points() {
        use curve25519_dalek::edwards::CompressedEdwardsY;
        let canonical: Vec<[u8; 32]> = curve25519_dalek::constants::EIGHT_TORSION
            .iter()
            .map(|p| p.compress().to_bytes())
            .collect();
        for c in &canonical {
            assert!(SMALL_ORDER_ENCODINGS.contains(c), "{}", hex::encode(c));
        }
        for e in SMALL_ORDER_ENCODINGS {
            let p = CompressedEdwardsY(e).decompress().unwrap();
            assert!(p.is_small_order(), "{}", hex::encode(e));
            assert!(canonical_y(&e));
        }
        // 2^255 − 19 .. 2^255 − 1 are non-canonical y values; p − 1 is canonical.
        let mut y = hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
        assert!(!canonical_y(&y));
        y[31] |= 0x80;
        assert!(!canonical_y(&y));
        y[0] = 0xff;
        assert!(!canonical_y(&y));
        y[0] = 0xec;
        assert!(canonical_y(&y));
    }

    fn signed_items(n: u8, message: &[u8]) -> (Vec<IdentityKey>, Vec<[u8; 64]>) {
        let ids: Vec<Identity> = (0..n).map(|i| Identity::from_seed([i; 32])).collect();
        let keys = ids
            .iter()
            .enumerate()
            .map(|(i, id)| IdentityKey::from_bytes(i as u32, &id.public()).unwrap())
            .collect();
        let sigs = ids.iter().map(|id| id.sign("batch", message)).collect();
        (keys, sigs)
    }

    fn items<'a>(
        keys: &'a [IdentityKey],
        sigs: &'a [[u8; 64]],
        message: &'a [u8],
    ) -> Vec<SignedItem<'a>> {
        keys.iter()
            .zip(sigs)
            .enumerate()
            .map(|(i, (key, signature))| SignedItem {
                signer: i as u32,
                key,
                message,
                signature,
            })
            .collect()
    }

    #[test]
    fn batches_accept_valid_signatures_and_name_the_first_bad_one() {
        let (keys, mut sigs) = signed_items(20, b"list");
        verify_batch("batch", &items(&keys, &sigs, b"list")).unwrap();
        verify_batch("batch", &items(&keys[..1], &sigs[..1], b"list")).unwrap();
        verify_batch("batch", &[]).unwrap();
        assert_eq!(
            verify_batch("other", &items(&keys, &sigs, b"list")).unwrap_err(),
            CryptoError::BadSignature {
                signer: 0,
                tag: "other"
            }
        );
        sigs[7][40] ^= 1;
        sigs[12][3] ^= 1;
        assert_eq!(
            verify_batch("batch", &items(&keys, &sigs, b"list")).unwrap_err(),
            CryptoError::BadSignature {
                signer: 7,
                tag: "batch"
            }
        );
        // Swapped signatures: each valid, for another key.
        let (keys, mut sigs) = signed_items(5, b"list");
        sigs.swap(1, 2);
        assert_eq!(
            verify_batch("batch", &items(&keys, &sigs, b"list")).unwrap_err(),
            CryptoError::BadSignature {
                signer: 1,
                tag: "batch"
            }
        );
    }

    #[test]
    fn batches_refuse_what_verify_strict_refuses() {
        let (keys, sigs) = signed_items(4, b"m");
        // R of small order or non-canonical, s non-canonical (s + l), a key of small order.
        let l = hex32("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010");
        let mut bad_r = sigs.clone();
        bad_r[2][..32].copy_from_slice(&SMALL_ORDER_ENCODINGS[6]);
        let mut noncanonical_r = sigs.clone();
        noncanonical_r[3][..32].copy_from_slice(&hex32(
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ));
        let mut big_s = sigs.clone();
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(big_s[1][32 + i]) + u16::from(l[i]) + carry;
            big_s[1][32 + i] = v as u8;
            carry = v >> 8;
        }
        for (bad, signer) in [(&bad_r, 2), (&noncanonical_r, 3), (&big_s, 1)] {
            assert_eq!(
                verify_batch("batch", &items(&keys, bad, b"m")).unwrap_err(),
                CryptoError::BadSignature {
                    signer,
                    tag: "batch"
                }
            );
        }
        let weak = IdentityKey::from_bytes(9, &SMALL_ORDER_ENCODINGS[0]).unwrap();
        let mut with_weak = keys.clone();
        with_weak[0] = weak;
        assert!(verify_batch("batch", &items(&with_weak, &sigs, b"m")).is_err());
    }

    #[test]
    fn identity_keys_decode_once_and_name_a_bad_key() {
        use curve25519_dalek::edwards::CompressedEdwardsY;
        let good: std::collections::BTreeMap<u32, [u8; 32]> = (1..=3u8)
            .map(|i| (u32::from(i), Identity::from_seed([i; 32]).public()))
            .collect();
        let keys = IdentityKeys::decode(&good).unwrap();
        assert_eq!(keys.indices().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(keys.contains(2) && !keys.contains(4));
        let id = Identity::from_seed([2; 32]);
        let sig = id.sign("t", b"m");
        verify_with(2, keys.get(2).unwrap(), "t", b"m", &sig).unwrap();
        // A y coordinate with no point on the curve names its index.
        let not_a_point = (2u8..)
            .map(|y| {
                let mut b = [0u8; 32];
                b[0] = y;
                b
            })
            .find(|b| CompressedEdwardsY(*b).decompress().is_none())
            .unwrap();
        let mut bad = good.clone();
        bad.insert(7, not_a_point);
        assert_eq!(
            IdentityKeys::decode(&bad).unwrap_err(),
            CryptoError::BadIdentityKey(7)
        );
        // Small order: decodable, but not for a roster.
        assert!(IdentityKey::from_bytes(5, &SMALL_ORDER_ENCODINGS[0]).is_ok());
        assert_eq!(
            IdentityKey::from_roster_bytes(5, &SMALL_ORDER_ENCODINGS[0]).unwrap_err(),
            CryptoError::BadIdentityKey(5)
        );
    }

    #[test]
    fn exported_secret_rebuilds_the_same_key() {
        let a = AgreementSecret::from_bytes([1; 32]);
        let rebuilt = AgreementSecret::from_bytes(*a.to_bytes());
        assert_eq!(rebuilt.public(), a.public());
    }
}
