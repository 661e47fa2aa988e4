//! Device and admin tokens: 32 random bytes in base64url, stored as a SHA-256 hash and compared in
//! constant time. Tokens are high-entropy, so a slow password hash would buy nothing.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret token, as handed to a device or an operator once.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Number of random bytes in a token.
    pub const BYTES: usize = 32;

    /// A token from random bytes (the caller owns the randomness: this crate has no IO).
    pub fn from_random_bytes(bytes: [u8; Self::BYTES]) -> Self {
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The token text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hash to store.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

/// SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl TokenHash {
    /// Hash of a presented token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Rebuilds a stored hash; `None` if `bytes` is not 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `presented` is the token this is a hash of, in constant time.
    pub fn verify(&self, presented: &str) -> bool {
        TokenHash::of(presented).0.ct_eq(&self.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_against_its_hash_only() {
        let t = Token::from_random_bytes([7; 32]);
        assert_eq!(t.as_str().len(), 43);
        let h = t.hash();
        assert!(h.verify(t.as_str()));
        assert!(!h.verify("nope"));
        assert_eq!(TokenHash::from_slice(h.as_bytes()), Some(h));
        assert!(!format!("{t:?}").contains(t.as_str()));
    }
}
