//! Typed constructors for verdicts and edits, so hooks read as decisions.

use crate::{
    AddressDecision, DataDecision, DataVerdict, Edit, Header, NextHop, Reply, Smarthost, TlsPolicy,
    Verdict,
};

impl Reply {
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.to_string(),
            text: text.into(),
        }
    }

    /// Parses a reply as plugin configurations write it, "550 5.7.1 Text of the reply", and
    /// checks that its code is in `codes` (for example `400..500` for a rate limit).
    pub fn parse(text: &str, codes: std::ops::Range<u16>) -> Result<Reply, String> {
        let mut words = text.splitn(3, ' ');
        let code = words
            .next()
            .and_then(|code| code.parse::<u16>().ok())
            .filter(|code| codes.contains(code))
            .ok_or_else(|| {
                format!(
                    "reply `{text}` must start with a code from {} to {}",
                    codes.start,
                    codes.end - 1
                )
            })?;
        Ok(Reply::new(
            code,
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        ))
    }
}

impl Verdict {
    /// `reply` as a refusal: a temporary one for a 4xx code, a permanent one otherwise.
    pub fn refuse(reply: &Reply) -> Verdict {
        if reply.code < 500 {
            Verdict::Tempfail(reply.clone())
        } else {
            Verdict::Reject(reply.clone())
        }
    }
}

impl Verdict {
    /// A permanent refusal (use a 5xx code).
    pub fn reject(code: u16, enhanced: &str, text: impl Into<String>) -> Verdict {
        Verdict::Reject(Reply::new(code, enhanced, text))
    }

    /// A temporary refusal (use a 4xx code).
    pub fn tempfail(code: u16, enhanced: &str, text: impl Into<String>) -> Verdict {
        Verdict::Tempfail(Reply::new(code, enhanced, text))
    }
}

impl AddressDecision {
    /// No opinion, no rewrite.
    pub fn next() -> AddressDecision {
        AddressDecision {
            verdict: Verdict::Continue,
            rewrite: None,
        }
    }

    pub fn accept() -> AddressDecision {
        AddressDecision {
            verdict: Verdict::Accept,
            rewrite: None,
        }
    }

    pub fn reject(code: u16, enhanced: &str, text: impl Into<String>) -> AddressDecision {
        AddressDecision {
            verdict: Verdict::reject(code, enhanced, text),
            rewrite: None,
        }
    }

    pub fn tempfail(code: u16, enhanced: &str, text: impl Into<String>) -> AddressDecision {
        AddressDecision {
            verdict: Verdict::tempfail(code, enhanced, text),
            rewrite: None,
        }
    }

    /// Replace the address, leaving the verdict to the rest of the chain.
    pub fn rewrite(address: impl Into<String>) -> AddressDecision {
        AddressDecision {
            verdict: Verdict::Continue,
            rewrite: Some(address.into()),
        }
    }
}

impl DataDecision {
    pub fn next() -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Continue,
            edits: Vec::new(),
        }
    }

    pub fn accept() -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Accept,
            edits: Vec::new(),
        }
    }

    pub fn reject(code: u16, enhanced: &str, text: impl Into<String>) -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Reject(Reply::new(code, enhanced, text)),
            edits: Vec::new(),
        }
    }

    pub fn tempfail(code: u16, enhanced: &str, text: impl Into<String>) -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Tempfail(Reply::new(code, enhanced, text)),
            edits: Vec::new(),
        }
    }

    pub fn quarantine(reason: impl Into<String>) -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Quarantine(reason.into()),
            edits: Vec::new(),
        }
    }

    pub fn discard() -> DataDecision {
        DataDecision {
            verdict: DataVerdict::Discard,
            edits: Vec::new(),
        }
    }

    /// Adds a header field at the top of the message.
    pub fn add_header(mut self, name: &str, value: impl Into<String>) -> DataDecision {
        self.edits.push(Edit::AddHeader(Header {
            name: name.to_string(),
            value: value.into(),
        }));
        self
    }

    /// Removes every header field with this name.
    pub fn remove_header(mut self, name: &str) -> DataDecision {
        self.edits.push(Edit::RemoveHeader(name.to_string()));
        self
    }

    /// Replaces every header field with this name by one with this value.
    pub fn replace_header(mut self, name: &str, value: impl Into<String>) -> DataDecision {
        self.edits.push(Edit::ReplaceHeader(Header {
            name: name.to_string(),
            value: value.into(),
        }));
        self
    }

    pub fn add_recipient(mut self, address: impl Into<String>) -> DataDecision {
        self.edits.push(Edit::AddRecipient(address.into()));
        self
    }

    pub fn remove_recipient(mut self, address: impl Into<String>) -> DataDecision {
        self.edits.push(Edit::RemoveRecipient(address.into()));
        self
    }
}

impl NextHop {
    /// Relay through `host:port` with the given STARTTLS policy.
    pub fn smarthost(host: impl Into<String>, port: u16, tls: TlsPolicy) -> NextHop {
        NextHop::Smarthost(Smarthost {
            host: host.into(),
            port,
            tls,
        })
    }

    pub fn fail(code: u16, enhanced: &str, text: impl Into<String>) -> NextHop {
        NextHop::Fail(Reply::new(code, enhanced, text))
    }
}
