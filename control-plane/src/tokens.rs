//! The token issuer: the control plane's Ed25519 signing key, kept in a file
//! of the data dir, and the rules for minting tokens (default and longest
//! lifetime). Nodes check the tokens on their own with the public key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_protocol::{Mode, RoomId, TokenClaims, TokenSigner, TokenVerifier};

/// Lifetime of a token when none is asked for.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Longest lifetime a token may be given.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Longest subject (user id) a token may carry, in characters.
pub const MAX_SUBJECT_LEN: usize = 128;

/// Where the key lives under a data dir: `<data_dir>/keys/token.key`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("token.key")
}

/// Why a key could not be loaded or a token could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenIssueError {
    #[error("cannot read token key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write token key {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token key {path} is not valid: {source}")]
    BadKey {
        path: PathBuf,
        source: weir_protocol::TokenError,
    },
    #[error("ttl of {asked:?} is longer than the longest allowed, {max:?}")]
    TtlTooLong { asked: Duration, max: Duration },
    #[error("subject is longer than {max} characters")]
    SubjectTooLong { max: usize },
    #[error("subject is empty")]
    SubjectEmpty,
}

/// A minted token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedToken {
    /// The token, `w1.…`.
    pub token: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix: u64,
}

/// Signs tokens with the control plane's key.
#[derive(Debug)]
pub struct TokenIssuer {
    signer: TokenSigner,
}

impl TokenIssuer {
    /// An issuer with the given key.
    pub fn new(signer: TokenSigner) -> Self {
        Self { signer }
    }

    /// Loads the key from `path`, or creates a new random one there (mode
    /// 0600, parent folders created) when the file does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenIssueError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(TokenIssueError::ReadKey {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Self, TokenIssueError> {
        let signer = TokenSigner::from_base64(text).map_err(|source| TokenIssueError::BadKey {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { signer })
    }

    fn create(path: &Path) -> Result<Self, TokenIssueError> {
        let write_err = |source| TokenIssueError::WriteKey {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        let signer = TokenSigner::generate();
        // Write a private temporary file, then link it into place: readers
        // never see a half-written key, and when two processes start at once
        // the first link wins and the other one loads the winner's key.
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let written = write_private(&tmp, &signer.to_base64());
        let linked = written.and_then(|()| fs::hard_link(&tmp, path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Self { signer }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(path).map_err(|source| TokenIssueError::ReadKey {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(path, &text)
            }
            Err(e) => Err(write_err(e)),
        }
    }

    /// The verifier nodes need (the public half of the key).
    pub fn verifier(&self) -> TokenVerifier {
        self.signer.verifier()
    }

    /// Mints a token for `subject` to do `mode` in `room`, valid for `ttl`
    /// ([`DEFAULT_TOKEN_TTL`] when `None`) from now.
    pub fn mint(
        &self,
        room: &RoomId,
        mode: Mode,
        subject: &str,
        ttl: Option<Duration>,
    ) -> Result<MintedToken, TokenIssueError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.mint_at(room, mode, subject, ttl, now)
    }

    /// [`TokenIssuer::mint`] at a given time (seconds since the Unix epoch).
    pub fn mint_at(
        &self,
        room: &RoomId,
        mode: Mode,
        subject: &str,
        ttl: Option<Duration>,
        now_unix: u64,
    ) -> Result<MintedToken, TokenIssueError> {
        let ttl = ttl.unwrap_or(DEFAULT_TOKEN_TTL);
        if ttl > MAX_TOKEN_TTL {
            return Err(TokenIssueError::TtlTooLong {
                asked: ttl,
                max: MAX_TOKEN_TTL,
            });
        }
        if subject.is_empty() {
            return Err(TokenIssueError::SubjectEmpty);
        }
        if subject.chars().count() > MAX_SUBJECT_LEN {
            return Err(TokenIssueError::SubjectTooLong {
                max: MAX_SUBJECT_LEN,
            });
        }
        // A zero ttl still gives a token that lives one second, so `exp` is
        // always after `iat`.
        let exp = now_unix.saturating_add(ttl.as_secs().max(1));
        let token = self.signer.sign(&TokenClaims {
            room: room.clone(),
            mode,
            sub: subject.to_owned(),
            iat: now_unix,
            exp,
        });
        Ok(MintedToken {
            token,
            expires_unix: exp,
        })
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weir-cp-test-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn room() -> RoomId {
        RoomId::parse("r1").unwrap()
    }

    #[test]
    fn key_is_created_private_and_loaded_again() {
        let dir = temp_dir();
        let path = key_path(&dir);
        let first = TokenIssuer::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(TokenSigner::from_base64(&text).is_ok());
        let second = TokenIssuer::load_or_create(&path).unwrap();
        assert_eq!(first.verifier().to_base64(), second.verifier().to_base64());
        // Only the key is left behind, no temporary files.
        assert_eq!(fs::read_dir(dir.join("keys")).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_key_file_is_an_error_naming_the_file() {
        let dir = temp_dir();
        let path = dir.join("token.key");
        fs::write(&path, "not a key").unwrap();
        let err = TokenIssuer::load_or_create(&path).unwrap_err();
        assert!(matches!(err, TokenIssueError::BadKey { .. }));
        assert!(err.to_string().contains("token.key"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn minted_tokens_verify_with_the_right_claims() {
        let issuer = TokenIssuer::new(TokenSigner::generate());
        let t = issuer
            .mint_at(&room(), Mode::Publish, "dev", None, 1000)
            .unwrap();
        assert_eq!(t.expires_unix, 1000 + 3600);
        let claims = issuer
            .verifier()
            .authorize(&t.token, &room(), Mode::Publish, 1001)
            .unwrap();
        assert_eq!(claims.sub, "dev");
        assert_eq!(claims.iat, 1000);

        let t = issuer
            .mint(&room(), Mode::Play, "v", Some(Duration::from_secs(60)))
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(t.expires_unix >= now + 59 && t.expires_unix <= now + 61);
    }

    #[test]
    fn ttl_and_subject_are_bounded() {
        let issuer = TokenIssuer::new(TokenSigner::generate());
        assert!(
            issuer
                .mint_at(&room(), Mode::Chat, "u", Some(MAX_TOKEN_TTL), 0)
                .is_ok()
        );
        assert!(matches!(
            issuer.mint_at(
                &room(),
                Mode::Chat,
                "u",
                Some(MAX_TOKEN_TTL + Duration::from_secs(1)),
                0
            ),
            Err(TokenIssueError::TtlTooLong { .. })
        ));
        assert!(matches!(
            issuer.mint_at(&room(), Mode::Chat, &"u".repeat(129), None, 0),
            Err(TokenIssueError::SubjectTooLong { .. })
        ));
        assert!(matches!(
            issuer.mint_at(&room(), Mode::Chat, "", None, 0),
            Err(TokenIssueError::SubjectEmpty)
        ));
    }
}
