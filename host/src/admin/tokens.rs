//! The admin API's bearer tokens: read from `[admin] tokens_file`, compared in constant time.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Tokens shorter than this are refused: a token is a password that cannot be rate-limited by
/// a human's patience.
pub const MIN_TOKEN_LENGTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: a token must be at least {MIN_TOKEN_LENGTH} characters")]
    TooShort { path: String, line: usize },
    #[error("{path}: no token in it")]
    Empty { path: String },
}

/// The accepted tokens, kept as their SHA-256 so every comparison takes the same time whatever
/// the token it is given.
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: name.clone(),
            source,
        })?;
        let mut digests = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < MIN_TOKEN_LENGTH {
                return Err(TokensError::TooShort {
                    path: name,
                    line: number + 1,
                });
            }
            digests.push(Sha256::digest(token.as_bytes()).into());
        }
        if digests.is_empty() {
            return Err(TokensError::Empty { path: name });
        }
        Ok(Tokens { digests })
    }

    /// The first token of the file, for the CLI on the same machine.
    pub fn first(path: &Path) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|line| {
                let token = line.trim();
                (!token.is_empty() && !token.starts_with('#')).then(|| token.to_string())
            })
    }

    /// Whether `token` is one of them. Every stored digest is compared, byte by byte, without
    /// stopping early.
    pub fn accepts(&self, token: &str) -> bool {
        let offered: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = 0u8;
        for digest in &self.digests {
            let difference = digest
                .iter()
                .zip(offered.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(difference == 0);
        }
        found == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_skipping_comments_and_short_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# operators\n\nabcdefghijklmnop0123\n  second-token-long-enough  \n",
        )
        .expect("write");
        let tokens = Tokens::load(&path).expect("load");
        assert!(tokens.accepts("abcdefghijklmnop0123"));
        assert!(tokens.accepts("second-token-long-enough"));
        assert!(!tokens.accepts("abcdefghijklmnop012"));
        assert!(!tokens.accepts(""));
        assert_eq!(
            Tokens::first(&path).as_deref(),
            Some("abcdefghijklmnop0123")
        );
        std::fs::write(&path, "short\n").expect("write");
        assert!(matches!(
            Tokens::load(&path),
            Err(TokensError::TooShort { line: 1, .. })
        ));
        std::fs::write(&path, "# nothing\n").expect("write");
        assert!(matches!(
            Tokens::load(&path),
            Err(TokensError::Empty { .. })
        ));
    }
}
