//! What a hook reads about its session and its message: the host's `session` and `body`
//! resources in a plugin, or facts the test harness ([`crate::testing`]) built, natively.
//! Plugins see one type either way, so the same code runs in the host and in `cargo test`.

use crate::bindings::switchyard::plugin::message::Body as HostBody;
use crate::bindings::switchyard::plugin::types::Session as HostSession;
use crate::Header;

/// The SMTP session, lent to a hook for the length of the call. Each method asks the host for
/// one fact (nothing is copied into the plugin until asked).
pub struct Session<'a>(SessionSource<'a>);

enum SessionSource<'a> {
    Host(&'a HostSession),
    Facts(&'a SessionFacts),
}

/// A session's facts, as the test harness gives them to a hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    pub client_ip: String,
    pub listener: String,
    pub submission: bool,
    pub helo: Option<String>,
    pub tls: bool,
    pub auth_identity: Option<String>,
    pub tenant: String,
}

impl<'a> Session<'a> {
    #[doc(hidden)]
    pub fn host(session: &'a HostSession) -> Session<'a> {
        Session(SessionSource::Host(session))
    }

    /// A session made of `facts` (what the test harness lends to hooks).
    pub fn of(facts: &'a SessionFacts) -> Session<'a> {
        Session(SessionSource::Facts(facts))
    }

    /// The client's IP address, as text ("192.0.2.1", "2001:db8::1").
    pub fn client_ip(&self) -> String {
        match &self.0 {
            SessionSource::Host(session) => session.client_ip(),
            SessionSource::Facts(facts) => facts.client_ip.clone(),
        }
    }

    /// The listener's name from the configuration.
    pub fn listener(&self) -> String {
        match &self.0 {
            SessionSource::Host(session) => session.listener(),
            SessionSource::Facts(facts) => facts.listener.clone(),
        }
    }

    /// True for a submission listener, false for inbound (MX) mail.
    pub fn submission(&self) -> bool {
        match &self.0 {
            SessionSource::Host(session) => session.submission(),
            SessionSource::Facts(facts) => facts.submission,
        }
    }

    /// The name the client gave in HELO/EHLO, once it has.
    pub fn helo(&self) -> Option<String> {
        match &self.0 {
            SessionSource::Host(session) => session.helo(),
            SessionSource::Facts(facts) => facts.helo.clone(),
        }
    }

    /// True once STARTTLS has succeeded.
    pub fn tls(&self) -> bool {
        match &self.0 {
            SessionSource::Host(session) => session.tls(),
            SessionSource::Facts(facts) => facts.tls,
        }
    }

    /// The identity the client authenticated as, once it has.
    pub fn auth_identity(&self) -> Option<String> {
        match &self.0 {
            SessionSource::Host(session) => session.auth_identity(),
            SessionSource::Facts(facts) => facts.auth_identity.clone(),
        }
    }

    /// The tenant of the mail under way ("" for none).
    pub fn tenant(&self) -> String {
        match &self.0 {
            SessionSource::Host(session) => session.tenant(),
            SessionSource::Facts(facts) => facts.tenant.clone(),
        }
    }
}

/// The message at the end of DATA, lent to the data hook: its header fields (parsed by the host)
/// and its content, read in chunks.
pub struct Body<'a>(BodySource<'a>);

enum BodySource<'a> {
    Host(&'a HostBody),
    Bytes(&'a [u8]),
}

impl<'a> Body<'a> {
    #[doc(hidden)]
    pub fn host(body: &'a HostBody) -> Body<'a> {
        Body(BodySource::Host(body))
    }

    /// The host's handle, when the host lent the message (not in a test).
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn host_body(&self) -> Option<&'a HostBody> {
        match self.0 {
            BodySource::Host(body) => Some(body),
            BodySource::Bytes(_) => None,
        }
    }

    /// A message made of `content` (headers, a blank line, the body; CRLF line endings).
    pub fn of(content: &'a [u8]) -> Body<'a> {
        Body(BodySource::Bytes(content))
    }

    /// The header fields, names as written and values unfolded.
    pub fn headers(&self) -> Vec<Header> {
        match &self.0 {
            BodySource::Host(body) => body.headers(),
            BodySource::Bytes(content) => parse_headers(content),
        }
    }

    /// The whole message's size in bytes.
    pub fn size(&self) -> u64 {
        match &self.0 {
            BodySource::Host(body) => body.size(),
            BodySource::Bytes(content) => content.len() as u64,
        }
    }

    /// Up to `length` bytes from `offset` (fewer at the end; none past it).
    pub fn read(&self, offset: u64, length: u32) -> Vec<u8> {
        match &self.0 {
            BodySource::Host(body) => body.read(offset, length),
            BodySource::Bytes(content) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(content.len());
                let end = start.saturating_add(length as usize).min(content.len());
                content[start..end].to_vec()
            }
        }
    }
}

/// The header section of `content`, unfolded as the host unfolds it for `body.headers()`: line
/// breaks removed, folding whitespace kept, the value trimmed.
fn parse_headers(content: &[u8]) -> Vec<Header> {
    let text = String::from_utf8_lossy(content);
    let section = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .split("\n\n")
        .next()
        .unwrap_or_default();
    let mut headers: Vec<Header> = Vec::new();
    for line in section.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.value.push_str(line);
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push(Header {
                name: name.to_string(),
                value: value.to_string(),
            });
        }
    }
    for header in &mut headers {
        header.value = header.value.trim().to_string();
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_as_the_host_lends_it() {
        let content = b"Subject: hello\r\n  world\r\nFrom: a@x.test\r\n\r\nbody\r\n";
        let body = Body::of(content);
        let headers = body.headers();
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[0].name, "Subject");
        // As the host gives it (host/src/plugins/host/message.rs): the fold's spaces kept.
        assert_eq!(headers[0].value, "hello  world");
        assert_eq!(body.size(), content.len() as u64);
        assert_eq!(body.read(0, 7), b"Subject");
        assert_eq!(body.read(content.len() as u64 - 6, 100), b"body\r\n");
        assert!(body.read(10_000, 5).is_empty());
    }
}
