//! Secrets at rest: AES-256-GCM for upstream secrets, argon2id for user keys, SHA-256 digests
//! for constant-time comparisons in memory.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const NONCE_LEN: usize = 12;

/// The key that encrypts upstream secrets and signs what replicas share through Redis. Debug
/// never shows it.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
    /// HMAC key derived from the master key, so anyone who can write to Redis still cannot
    /// forge a cache entry (a verified key, a user's rules) that a replica would trust.
    signing_key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Reads base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> anyhow::Result<Self> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| anyhow::anyhow!("the master key is not valid base64"))?;
        anyhow::ensure!(
            bytes.len() == 32,
            "the master key must be base64 of 32 bytes, got {} bytes",
            bytes.len()
        );
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| anyhow::anyhow!("the master key has the wrong length"))?;
        let mut derivation = Sha256::new();
        derivation.update(b"switchyard shared-cache signing key\0");
        derivation.update(&bytes);
        Ok(MasterKey {
            cipher,
            signing_key: derivation.finalize().into(),
        })
    }

    /// A new random master key, as base64.
    pub fn generate_base64() -> anyhow::Result<String> {
        Ok(B64.encode(random_bytes::<32>()?))
    }

    /// Encrypts `secret` bound to `record_id` (so a ciphertext cannot be moved to another
    /// record) under a fresh random nonce; returns base64(nonce ‖ ciphertext ‖ tag).
    pub fn encrypt(&self, record_id: &str, secret: &str) -> anyhow::Result<String> {
        let nonce = random_bytes::<NONCE_LEN>()?;
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: record_id.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("encryption failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(B64.encode(out))
    }

    /// Reverses [`MasterKey::encrypt`]; fails for another master key or another record.
    pub fn decrypt(&self, record_id: &str, sealed: &str) -> anyhow::Result<String> {
        let bytes = B64
            .decode(sealed)
            .map_err(|_| anyhow::anyhow!("stored secret is not base64"))?;
        anyhow::ensure!(bytes.len() > NONCE_LEN, "stored secret is too short");
        let (nonce, body) = bytes.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: record_id.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("stored secret does not decrypt (wrong master key?)"))?;
        String::from_utf8(plain).map_err(|_| anyhow::anyhow!("stored secret is not UTF-8"))
    }
}

impl MasterKey {
    /// HMAC-SHA-256 of `data` under the key derived for shared caches.
    pub fn sign(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.signing_key)
            .expect("HMAC accepts a key of any length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is [`MasterKey::sign`] of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.signing_key)
            .expect("HMAC accepts a key of any length");
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }
}

/// `N` bytes from the operating system's random generator.
pub fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    Ok(out)
}

/// Hashes a user-key secret with argon2id (default parameters, random salt). CPU-heavy:
/// call it on a blocking thread.
pub fn hash_secret(secret: &str) -> anyhow::Result<String> {
    let salt =
        SaltString::encode_b64(&random_bytes::<16>()?).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))
}

/// Checks a secret against a stored argon2 hash. CPU-heavy: call it on a blocking thread.
pub fn verify_secret(secret: &str, stored_hash: &str) -> bool {
    PasswordHash::new(stored_hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// SHA-256 of `data`: what the in-memory caches keep instead of a secret.
pub fn digest(data: &str) -> [u8; 32] {
    Sha256::digest(data.as_bytes()).into()
}

/// Compares two strings in time that depends on neither's content nor length.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    digest(a).ct_eq(&digest(b)).into()
}

/// The last four characters of a secret, the only part an admin read shows; nothing of a
/// secret of eight characters or fewer, of which four would give most away.
pub fn hint(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 8 {
        return String::new();
    }
    chars[chars.len() - 4..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_are_bound_to_their_record() {
        let key = MasterKey::from_base64(&MasterKey::generate_base64().unwrap()).unwrap();
        let sealed = key.encrypt("upk_1", "provider-secret").unwrap();
        assert!(!sealed.contains("provider-secret"));
        assert_eq!(key.decrypt("upk_1", &sealed).unwrap(), "provider-secret");
        assert!(key.decrypt("upk_2", &sealed).is_err());
        // A fresh nonce each time: the same secret never encrypts the same way twice.
        assert_ne!(sealed, key.encrypt("upk_1", "provider-secret").unwrap());
        let other = MasterKey::from_base64(&MasterKey::generate_base64().unwrap()).unwrap();
        assert!(other.decrypt("upk_1", &sealed).is_err());
    }

    #[test]
    fn master_key_must_be_32_bytes_of_base64() {
        assert!(MasterKey::from_base64("short").is_err());
        assert!(MasterKey::from_base64(&B64.encode([0u8; 16])).is_err());
    }

    #[test]
    fn argon2_verifies_only_the_right_secret() {
        let hash = hash_secret("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_secret("s3cret", &hash));
        assert!(!verify_secret("s3cres", &hash));
        assert!(!verify_secret("s3cret", "garbage"));
    }

    #[test]
    fn hints_show_four_characters_at_most() {
        assert_eq!(hint("abcdefghijklmnop"), "mnop");
        assert_eq!(hint("short"), "");
    }
}
