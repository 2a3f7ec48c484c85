//! Key agreement, key derivation, share encryption and identity signatures for secure
//! aggregation, each bound to the session and round so nothing can be replayed elsewhere.
//!
//! # Specification (version 1)
//!
//! - Key agreement: X25519 between a participant's round secret and a peer's round public
//!   key; an all-zero (non-contributory) shared secret is refused.
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
//!   another.
//!
//! Test vectors: `vectors/secagg_crypto.json`, generated independently (Python
//! `cryptography`) by `scripts/secagg_vectors.py`, whose docstring defines each field, and
//! reproduced through this API by `fedcore/tests/secagg_vectors.rs`.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
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
pub struct AgreementSecret(StaticSecret);

impl AgreementSecret {
    /// The secret for 32 random bytes supplied by the caller.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        AgreementSecret(StaticSecret::from(bytes))
    }

    /// The public key to advertise.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }

    /// The secret's bytes, for Shamir sharing; wiped when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    fn derive(
        &self,
        peer_public: &[u8; 32],
        ctx: &SessionContext,
        label: &[u8],
        me: u32,
        peer: u32,
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        let shared = self.0.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(CryptoError::NonContributory { peer });
        }
        let mut info = Vec::with_capacity(label.len() + 8);
        info.extend_from_slice(label);
        info.extend_from_slice(&me.min(peer).to_le_bytes());
        info.extend_from_slice(&me.max(peer).to_le_bytes());
        Hkdf::<Sha256>::new(Some(&ctx.salt()), shared.as_bytes())
            .expand(&info, out)
            .expect("16 and 32 bytes are valid HKDF-SHA256 output lengths");
        Ok(())
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
        self.derive(peer_public, ctx, b"mask", me, peer, seed.as_mut())?;
        Ok(seed)
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
        let mut key = Zeroizing::new([0u8; 32]);
        self.derive(peer_public, ctx, b"share-key", me, peer, key.as_mut())?;
        let key: &[u8; 32] = &key;
        Ok(ShareKey(ChaCha20Poly1305::new(key.into())))
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
    match VerifyingKey::from_bytes(public) {
        Ok(key) if !key.is_weak() => Ok(()),
        _ => Err(CryptoError::BadIdentityKey(0)),
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
    let key = VerifyingKey::from_bytes(public).map_err(|_| CryptoError::BadIdentityKey(signer))?;
    key.verify_strict(
        &signed_bytes(tag, message),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| CryptoError::BadSignature { signer, tag })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn exported_secret_rebuilds_the_same_key() {
        let a = AgreementSecret::from_bytes([1; 32]);
        let rebuilt = AgreementSecret::from_bytes(*a.to_bytes());
        assert_eq!(rebuilt.public(), a.public());
    }
}
