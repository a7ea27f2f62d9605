//! Parsing of the path arguments of MAIL FROM and RCPT TO (RFC 5321 4.1.2, RFC 6531 for UTF-8).

use std::fmt;

use crate::mail::reply::Reply;

/// An address `local@domain`. The domain is kept as given; compare with [`Mailbox::domain_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
}

impl Mailbox {
    /// The domain in the form used for matching: lower case, without a trailing dot.
    pub fn domain_key(&self) -> String {
        domain_key(&self.domain)
    }

    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// Splits a stored address string again.
    pub fn from_stored(address: &str) -> Option<Mailbox> {
        let (local, domain) = address.rsplit_once('@')?;
        Some(Mailbox {
            local: local.to_string(),
            domain: domain.to_string(),
        })
    }
}

/// Lower case, no trailing dot.
pub fn domain_key(domain: &str) -> String {
    domain.trim_end_matches('.').to_lowercase()
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// A parsed `FROM:<...> params` or `TO:<...> params` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathArgument {
    /// `None` is the null path `<>`.
    pub mailbox: Option<Mailbox>,
    /// ESMTP parameters, keyword upper-cased.
    pub params: Vec<(String, Option<String>)>,
}

impl PathArgument {
    pub fn param(&self, keyword: &str) -> Option<&Option<String>> {
        self.params
            .iter()
            .find(|(key, _)| key == keyword)
            .map(|(_, value)| value)
    }
}

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;
const MAX_PATH: usize = 256;

/// Parses the text after `MAIL FROM:` or `RCPT TO:`. Errors are the reply to send.
pub fn parse_path_argument(text: &str) -> Result<PathArgument, Reply> {
    let syntax = |what: &str| Reply::new(501, "5.1.3", format!("Bad address syntax: {what}"));
    let text = text.trim_start();
    let rest = text
        .strip_prefix('<')
        .ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: address must be enclosed in <>"))?;
    let close = find_path_end(rest).ok_or_else(|| syntax("missing >"))?;
    let inner = &rest[..close];
    let params_text = &rest[close + 1..];
    if !params_text.is_empty() && !params_text.starts_with(' ') {
        return Err(Reply::new(501, "5.5.4", "Syntax: space needed after >"));
    }
    if inner.len() > MAX_PATH {
        return Err(Reply::new(501, "5.1.3", "Path too long"));
    }
    // A source route (<@relay1,@relay2:user@domain>) is accepted and ignored (RFC 5321 C).
    let inner = match inner.strip_prefix('@') {
        Some(route) => route
            .split_once(':')
            .map(|(_, address)| address)
            .ok_or_else(|| syntax("bad source route"))?,
        None => inner,
    };
    let mailbox = if inner.is_empty() {
        None
    } else {
        Some(parse_mailbox(inner).map_err(|what| syntax(&what))?)
    };
    let mut params = Vec::new();
    for word in params_text.split(' ').filter(|word| !word.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key, Some(value.to_string())),
            None => (word, None),
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Reply::new(
                501,
                "5.5.4",
                format!("Bad parameter syntax: {word}"),
            ));
        }
        params.push((key.to_ascii_uppercase(), value));
    }
    Ok(PathArgument { mailbox, params })
}

/// Index of the `>` that closes the path, skipping quoted strings.
fn find_path_end(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (index, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(index),
            _ => {}
        }
    }
    None
}

fn parse_mailbox(text: &str) -> Result<Mailbox, String> {
    let at = text.rfind('@').ok_or("missing @domain")?;
    let (local, domain) = (&text[..at], &text[at + 1..]);
    if local.is_empty() {
        return Err("empty local part".to_string());
    }
    if local.len() > MAX_LOCAL {
        return Err("local part longer than 64 octets".to_string());
    }
    if domain.len() > MAX_DOMAIN {
        return Err("domain longer than 255 octets".to_string());
    }
    check_local_part(local)?;
    check_domain(domain)?;
    Ok(Mailbox {
        local: local.to_string(),
        domain: domain.to_string(),
    })
}

fn check_local_part(local: &str) -> Result<(), String> {
    if local.starts_with('"') {
        if local.len() < 2 || !local.ends_with('"') {
            return Err("unterminated quoted local part".to_string());
        }
        if local.chars().any(|c| c.is_control()) {
            return Err("control character in local part".to_string());
        }
        return Ok(());
    }
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~.";
    let valid = local.chars().all(|c| {
        c.is_ascii_alphanumeric() || SPECIALS.contains(c) || (!c.is_ascii() && !c.is_control())
    });
    if !valid || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(format!("invalid local part `{local}`"));
    }
    Ok(())
}

/// Whether `domain` is a domain (or address literal) as strict as one in a client's address.
pub fn is_domain(domain: &str) -> bool {
    domain.len() <= MAX_DOMAIN && check_domain(domain).is_ok()
}

fn check_domain(domain: &str) -> Result<(), String> {
    if let Some(literal) = domain.strip_prefix('[') {
        let literal = literal
            .strip_suffix(']')
            .ok_or("unterminated address literal")?;
        let literal = literal.strip_prefix("IPv6:").unwrap_or(literal);
        return literal
            .parse::<std::net::IpAddr>()
            .map(|_| ())
            .map_err(|_| format!("invalid address literal `{domain}`"));
    }
    let labels: Vec<&str> = domain.trim_end_matches('.').split('.').collect();
    let valid_label = |label: &&str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| {
                c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric())
            })
    };
    if domain.is_empty() || !labels.iter().all(valid_label) {
        return Err(format!("invalid domain `{domain}`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(text: &str) -> Mailbox {
        parse_path_argument(text)
            .expect("valid")
            .mailbox
            .expect("not null")
    }

    #[test]
    fn plain_and_params() {
        let parsed =
            parse_path_argument("<alice@example.com> SIZE=1000 BODY=8BITMIME").expect("valid");
        assert_eq!(
            parsed.mailbox.clone().expect("mailbox").to_string(),
            "alice@example.com"
        );
        assert_eq!(parsed.param("SIZE"), Some(&Some("1000".to_string())));
        assert_eq!(parsed.param("BODY"), Some(&Some("8BITMIME".to_string())));
    }

    #[test]
    fn null_path_and_space_after_colon() {
        assert_eq!(parse_path_argument(" <>").expect("null").mailbox, None);
    }

    #[test]
    fn utf8_and_quoted() {
        assert!(!mailbox("<jøran@bücher.example>").is_ascii());
        assert_eq!(mailbox("<\"john doe\"@example.com>").local, "\"john doe\"");
        assert_eq!(
            mailbox("<@relay.example:bob@example.com>").to_string(),
            "bob@example.com"
        );
        assert_eq!(mailbox("<postmaster@[127.0.0.1]>").domain, "[127.0.0.1]");
    }

    #[test]
    fn rejects() {
        for bad in [
            "alice@example.com",
            "<alice>",
            "<@example.com>",
            "<a..b@example.com>",
            "<a@exa mple.com>",
            "<a@-x.com>",
            "<a@example.com",
        ] {
            let reply = parse_path_argument(bad).expect_err(bad);
            assert_eq!(reply.code, 501, "{bad}");
        }
        let long_local = format!("<{}@example.com>", "a".repeat(65));
        assert!(parse_path_argument(&long_local).is_err());
    }

    #[test]
    fn domains_from_plugins() {
        assert!(is_domain("example.test"));
        assert!(is_domain("[192.0.2.1]"));
        for bad in [
            "",
            "exa mple.test",
            "example.test\r\nX: y",
            "a\0.test",
            "-x.test",
        ] {
            assert!(!is_domain(bad), "{bad:?}");
        }
    }
}
