//! User API keys: `sk-<lookup id>-<secret>`. The lookup id finds the stored record without
//! scanning; only an argon2 hash of the secret is stored.

use base64::Engine;

const PREFIX: &str = "sk-";
const LOOKUP_HEX_LEN: usize = 16;
const SECRET_BYTES: usize = 32;

/// A key presented by a client, split into its parts. The secret is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey {
    lookup: String,
    secret: String,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey({})", self.record_id())
    }
}

impl PresentedKey {
    /// Splits a full key; `None` when it is not shaped like a Switchyard key.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(PREFIX)?;
        let lookup = rest.get(..LOOKUP_HEX_LEN)?;
        let secret = rest.get(LOOKUP_HEX_LEN..)?.strip_prefix('-')?;
        let lookup_ok = lookup
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let secret_ok = !secret.is_empty()
            && secret.len() <= 128
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (lookup_ok && secret_ok).then(|| PresentedKey {
            lookup: lookup.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The id of the stored key record this key claims to be.
    pub fn record_id(&self) -> String {
        record_id(&self.lookup)
    }

    /// The secret part, to verify against the stored hash.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// A freshly generated key: the full text (shown once) and its parts.
pub struct GeneratedKey {
    /// The whole key, for the client.
    pub full: String,
    /// The stored record's id.
    pub record_id: String,
    /// The secret part, to hash.
    pub secret: String,
    /// A hint safe to show later: the prefix and the last four characters.
    pub hint: String,
}

/// Makes a new key from the operating system's random generator.
pub fn generate() -> anyhow::Result<GeneratedKey> {
    let mut lookup = [0u8; LOOKUP_HEX_LEN / 2];
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut lookup).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    let lookup: String = lookup.iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let full = format!("{PREFIX}{lookup}-{secret}");
    let hint = format!("{PREFIX}{lookup}-...{}", &secret[secret.len() - 4..]);
    Ok(GeneratedKey {
        record_id: record_id(&lookup),
        full,
        secret,
        hint,
    })
}

/// Built by hand rather than with `format!`: every call pays this once, and the formatting
/// machinery costs several times what two copies do.
fn record_id(lookup: &str) -> String {
    let mut id = String::with_capacity(4 + lookup.len());
    id.push_str("key_");
    id.push_str(lookup);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_record() {
        let key = generate().unwrap();
        assert!(key.full.starts_with("sk-"));
        let parsed = PresentedKey::parse(&key.full).unwrap();
        assert_eq!(parsed.record_id(), key.record_id);
        assert_eq!(parsed.secret(), key.secret);
        assert!(!format!("{parsed:?}").contains(&key.secret));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "sk-",
            "sk-0123",
            "pk-0123456789abcdef-abc",
            "sk-0123456789ABCDEF-abc",
            "sk-0123456789abcdef-",
            "sk-0123456789abcdefxabc",
            "sk-0123456789abcdef-a b",
        ] {
            assert!(PresentedKey::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(generate().unwrap().full, generate().unwrap().full);
    }
}
