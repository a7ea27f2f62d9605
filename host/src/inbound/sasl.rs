//! The SASL mechanisms SMTP AUTH offers (RFC 4954): PLAIN (RFC 4616) and LOGIN (the
//! de-facto mechanism older clients still use). Both send the password itself, so the session
//! offers them only over TLS. This module only decodes what the client sends.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::mail::reply::Reply;

/// Longest line of an AUTH exchange (RFC 4954 4: 12288 octets).
pub const MAX_AUTH_LINE: usize = 12288;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What the client claims: who it is and its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub identity: String,
    pub password: String,
}

/// One line of the client's side of the exchange, decoded: `Err` is the reply that ends the
/// exchange (a cancel with `*` or bad base64).
pub fn decode_response(line: &str) -> Result<Vec<u8>, Reply> {
    let line = line.trim_end();
    if line == "*" {
        return Err(Reply::new(501, "5.7.0", "Authentication cancelled"));
    }
    // "=" is an empty initial response (RFC 4954 4).
    if line == "=" {
        return Ok(Vec::new());
    }
    STANDARD
        .decode(line)
        .map_err(|_| Reply::new(501, "5.5.2", "Cannot decode the response: not base64"))
}

/// The PLAIN message: `authzid NUL authcid NUL passwd`. A client may only act as itself: an
/// authorization identity other than the authentication identity is refused.
pub fn plain(message: &[u8]) -> Result<Credentials, Reply> {
    let malformed = || Reply::new(501, "5.5.2", "Malformed PLAIN message");
    let mut parts = message.split(|&byte| byte == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| malformed());
    let (authzid, identity, password) = (text(authzid)?, text(authcid)?, text(password)?);
    if identity.is_empty() {
        return Err(malformed());
    }
    if !authzid.is_empty() && authzid != identity {
        return Err(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid: may not act as another user",
        ));
    }
    Ok(Credentials { identity, password })
}

/// A LOGIN answer (user name or password) as text.
pub fn login_text(message: Vec<u8>) -> Result<String, Reply> {
    String::from_utf8(message).map_err(|_| Reply::new(501, "5.5.2", "Response is not UTF-8"))
}

/// The base64 text of a server challenge.
pub fn challenge(text: &str) -> String {
    STANDARD.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages() {
        let good = plain(b"\0alice@example.test\0secret").expect("plain");
        assert_eq!(good.identity, "alice@example.test");
        assert_eq!(good.password, "secret");
        assert!(plain(b"alice@example.test\0alice@example.test\0secret").is_ok());
        assert_eq!(plain(b"bob\0alice\0secret").expect_err("act as").code, 535);
        assert_eq!(plain(b"\0alice").expect_err("two parts").code, 501);
        assert_eq!(plain(b"\0\0secret").expect_err("no name").code, 501);
        assert_eq!(plain(b"\0a\0b\0c").expect_err("four parts").code, 501);
        assert_eq!(plain(b"\0\xff\0secret").expect_err("not utf-8").code, 501);
    }

    #[test]
    fn responses() {
        assert_eq!(decode_response("*").expect_err("cancel").enhanced, "5.7.0");
        assert_eq!(decode_response("=").expect("empty"), Vec::<u8>::new());
        assert_eq!(decode_response("YWxpY2U=").expect("base64"), b"alice");
        assert_eq!(decode_response("not base64!").expect_err("bad").code, 501);
        assert_eq!(challenge("Username:"), "VXNlcm5hbWU6");
    }
}
