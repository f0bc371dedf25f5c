//! Access tokens: signed by the control plane (Ed25519), checked by nodes on
//! their own with the public key, so nodes keep admitting holders of valid
//! tokens while the control plane is down.
//!
//! Format: `w1.<base64url(claims json)>.<base64url(signature)>`, the signature
//! covering the bytes `w1.<base64url(claims json)>`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::RoomId;

const PREFIX: &str = "w1.";
/// Longest token accepted; anything longer is refused before parsing.
pub const MAX_TOKEN_LEN: usize = 2048;

/// What a token allows its holder to do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Publish media (WHIP, SRT).
    Publish,
    /// Play media (WHEP, HLS).
    Play,
    /// Take part in the room's chat.
    Chat,
}

impl Mode {
    /// The mode's name as used in URLs, streamids and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Publish => "publish",
            Mode::Play => "play",
            Mode::Chat => "chat",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        match s {
            "publish" => Ok(Mode::Publish),
            "play" => Ok(Mode::Play),
            "chat" => Ok(Mode::Chat),
            other => Err(TokenError::UnknownMode(other.to_owned())),
        }
    }
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// The room the token is for.
    pub room: RoomId,
    /// What it allows.
    pub mode: Mode,
    /// Who holds it (a user id); a reconnecting publisher with the same
    /// subject takes over its own stale session.
    pub sub: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature is not valid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for room {token_room:?}, not {wanted:?}")]
    WrongRoom { token_room: String, wanted: String },
    #[error("token allows {allowed:?}, not {wanted:?}")]
    WrongMode { allowed: Mode, wanted: Mode },
    #[error("unknown mode {0:?}: expected publish, play or chat")]
    UnknownMode(String),
    #[error("bad key: {0}")]
    BadKey(String),
}

/// Signs tokens. Lives in the control plane only.
pub struct TokenSigner {
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A new random key.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Loads a key from its 32 secret bytes, base64url encoded.
    pub fn from_base64(s: &str) -> Result<Self, TokenError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| TokenError::BadKey(e.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::BadKey("expected 32 bytes".into()))?;
        Ok(Self {
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// The secret key, base64url encoded (to store it).
    pub fn to_base64(&self) -> String {
        B64.encode(self.key.to_bytes())
    }

    /// The verifier for tokens of this signer.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            key: self.key.verifying_key(),
        }
    }

    /// Signs claims into a token string.
    pub fn sign(&self, claims: &TokenClaims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let mut out = String::with_capacity(160);
        out.push_str(PREFIX);
        out.push_str(&B64.encode(json));
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&B64.encode(sig.to_bytes()));
        out
    }
}

/// Checks tokens. Every node holds one.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    key: VerifyingKey,
}

impl TokenVerifier {
    /// Loads a public key from its 32 bytes, base64url encoded.
    pub fn from_base64(s: &str) -> Result<Self, TokenError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| TokenError::BadKey(e.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TokenError::BadKey("expected 32 bytes".into()))?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|e| TokenError::BadKey(e.to_string()))?;
        Ok(Self { key })
    }

    /// The public key, base64url encoded (to hand it to nodes).
    pub fn to_base64(&self) -> String {
        B64.encode(self.key.to_bytes())
    }

    /// Checks signature and expiry and returns the claims.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("unknown version prefix"))?;
        let (payload, sig) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("missing signature"))?;
        let sig = B64
            .decode(sig)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let sig: [u8; 64] = sig
            .try_into()
            .map_err(|_| TokenError::Malformed("signature has the wrong length"))?;
        let signed = &token[..PREFIX.len() + payload.len()];
        self.key
            .verify(signed.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| TokenError::BadSignature)?;
        let json = B64
            .decode(payload)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: TokenClaims = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("claims are not valid"))?;
        if claims.exp <= now_unix {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies a token and checks that it allows `mode` in `room`.
    pub fn authorize(
        &self,
        token: &str,
        room: &RoomId,
        mode: Mode,
        now_unix: u64,
    ) -> Result<TokenClaims, TokenError> {
        let claims = self.verify(token, now_unix)?;
        if &claims.room != room {
            return Err(TokenError::WrongRoom {
                token_room: claims.room.to_string(),
                wanted: room.to_string(),
            });
        }
        if claims.mode != mode {
            return Err(TokenError::WrongMode {
                allowed: claims.mode,
                wanted: mode,
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> TokenClaims {
        TokenClaims {
            room: RoomId::parse("r1").unwrap(),
            mode: Mode::Play,
            sub: "u1".into(),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let s = TokenSigner::generate();
        let v = s.verifier();
        let t = s.sign(&claims(200));
        assert_eq!(v.verify(&t, 150).unwrap(), claims(200));
        assert_eq!(v.verify(&t, 200), Err(TokenError::Expired));
        let room = RoomId::parse("r1").unwrap();
        assert!(v.authorize(&t, &room, Mode::Play, 150).is_ok());
        assert!(matches!(
            v.authorize(&t, &room, Mode::Publish, 150),
            Err(TokenError::WrongMode { .. })
        ));
        let other = RoomId::parse("r2").unwrap();
        assert!(matches!(
            v.authorize(&t, &other, Mode::Play, 150),
            Err(TokenError::WrongRoom { .. })
        ));
    }

    #[test]
    fn other_keys_and_tampering_are_refused() {
        let s = TokenSigner::generate();
        let t = s.sign(&claims(200));
        let other = TokenSigner::generate().verifier();
        assert_eq!(other.verify(&t, 150), Err(TokenError::BadSignature));

        // Swap the claims for different ones, keep the signature.
        let forged_claims =
            B64.encode(br#"{"room":"r1","mode":"publish","sub":"u1","iat":1,"exp":999}"#);
        let sig = t.rsplit('.').next().unwrap();
        let forged = format!("w1.{forged_claims}.{sig}");
        assert_eq!(
            s.verifier().verify(&forged, 150),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let v = TokenSigner::generate().verifier();
        for t in [
            "",
            "w1.",
            "w1..",
            "w1.abc.def",
            "x",
            "w1.!!!.???",
            &"w1.a".repeat(1000),
        ] {
            assert!(
                matches!(v.verify(t, 0), Err(TokenError::Malformed(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn keys_round_trip_through_base64() {
        let s = TokenSigner::generate();
        let s2 = TokenSigner::from_base64(&s.to_base64()).unwrap();
        let v = TokenVerifier::from_base64(&s.verifier().to_base64()).unwrap();
        let t = s2.sign(&claims(200));
        assert!(v.verify(&t, 1).is_ok());
        assert!(TokenVerifier::from_base64("short").is_err());
    }
}
