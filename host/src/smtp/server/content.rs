//! Message content once received (see `data_reader.rs` for reading it): the host's own headers,
//! the data hooks' edits, and forged authentication results.

use crate::plugins::bindings::types::Edit;
use crate::smtp::text::{is_header_name, is_header_value};

/// The header section: everything before the first empty line.
fn header_section(content: &[u8]) -> &[u8] {
    if content.starts_with(b"\r\n") {
        return &[];
    }
    match memchr::memmem::find(content, b"\r\n\r\n") {
        Some(end) => &content[..end + 2],
        None => content,
    }
}

/// Names of the header fields, in order (continuation lines skipped).
fn header_names(content: &[u8]) -> impl Iterator<Item = &[u8]> {
    header_section(content)
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty() && !line.starts_with(b" ") && !line.starts_with(b"\t"))
        .filter_map(|line| {
            line.iter()
                .position(|&b| b == b':')
                .map(|colon| line[..colon].trim_ascii())
        })
}

pub fn count_headers(content: &[u8], name: &str) -> usize {
    header_names(content)
        .filter(|found| found.eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

/// Facts for the Received header the host prepends.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: std::net::IpAddr,
    pub hostname: &'a str,
    pub protocol: &'a str,
    pub tls: Option<String>,
    pub queue_id: &'a str,
    pub single_recipient: Option<String>,
}

/// The content as queued: a Received header first, and a Message-ID added if the message has none
/// (RFC 5321 4.4; RFC 5322 3.6.4 says it SHOULD be there).
pub fn stamp(content: Vec<u8>, trace: &Trace<'_>) -> Vec<u8> {
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S +0000");
    let mut header = format!(
        "Received: from {} ([{}])\r\n\tby {} (Switchyard)",
        trace.helo, trace.client_ip, trace.hostname
    );
    if let Some(tls) = &trace.tls {
        header.push_str(&format!(" ({tls})"));
    }
    header.push_str(&format!(
        "\r\n\twith {} id {}",
        trace.protocol, trace.queue_id
    ));
    if let Some(recipient) = &trace.single_recipient {
        header.push_str(&format!("\r\n\tfor <{recipient}>"));
    }
    header.push_str(&format!("; {date}\r\n"));
    if count_headers(&content, "Message-ID") == 0 {
        header.push_str(&format!(
            "Message-ID: <{}@{}>\r\n",
            trace.queue_id, trace.hostname
        ));
    }
    let mut stamped = Vec::with_capacity(header.len() + content.len());
    stamped.extend_from_slice(header.as_bytes());
    stamped.extend_from_slice(&content);
    stamped
}

/// Applies the data hooks' header edits in chain order: additions go to the top of the header
/// section (in the order made), removals drop every field of that name, replacements do both.
/// Edits with a malformed name or a value holding a control character (CR, LF, NUL...) are
/// ignored: no plugin can start a header field of its own or cut one short.
pub fn edit_headers(content: &[u8], edits: &[Edit]) -> Vec<u8> {
    let touches_headers = edits.iter().any(|edit| {
        matches!(
            edit,
            Edit::AddHeader(_) | Edit::RemoveHeader(_) | Edit::ReplaceHeader(_)
        )
    });
    if !touches_headers {
        return content.to_vec();
    }
    let (fields, header_end) = header_fields(content);
    // (lower-case name, raw field, added by an edit)
    let mut fields: Vec<(String, Vec<u8>, bool)> = fields
        .into_iter()
        .map(|(name, raw)| (name, raw, false))
        .collect();
    for edit in edits {
        let (remove, add) = match edit {
            Edit::AddHeader(header) => (None, Some(header)),
            Edit::RemoveHeader(name) => (Some(name.to_ascii_lowercase()), None),
            Edit::ReplaceHeader(header) => (Some(header.name.to_ascii_lowercase()), Some(header)),
            Edit::AddRecipient(_) | Edit::RemoveRecipient(_) => continue,
        };
        if let Some(header) = add {
            if !is_header_name(&header.name) || !is_header_value(&header.value) {
                tracing::warn!(header = %crate::smtp::text::one_line(&header.name), "plugin header edit ignored: invalid name or value");
                continue;
            }
        }
        if let Some(name) = remove {
            fields.retain(|(field, _, _)| *field != name);
        }
        if let Some(header) = add {
            let raw = format!("{}: {}\r\n", header.name, header.value).into_bytes();
            let top = fields.iter().take_while(|(_, _, added)| *added).count();
            fields.insert(top, (header.name.to_ascii_lowercase(), raw, true));
        }
    }
    let mut edited = Vec::with_capacity(content.len() + 256);
    for (_, raw, _) in fields {
        edited.extend_from_slice(&raw);
    }
    edited.extend_from_slice(&content[header_end..]);
    edited
}

/// The header fields of a message, each as (lower-case name, raw field with its continuation
/// lines and CRLFs), and where the header section ends.
fn header_fields(content: &[u8]) -> (Vec<(String, Vec<u8>)>, usize) {
    let header_end = if content.starts_with(b"\r\n") {
        0
    } else {
        memchr::memmem::find(content, b"\r\n\r\n")
            .map(|end| end + 2)
            .unwrap_or(content.len())
    };
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for line in content[..header_end].split_inclusive(|&b| b == b'\n') {
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        match fields.last_mut() {
            Some((_, raw)) if continuation => raw.extend_from_slice(line),
            _ => {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                fields.push((
                    String::from_utf8_lossy(name).trim().to_ascii_lowercase(),
                    line.to_vec(),
                ));
            }
        }
    }
    (fields, header_end)
}

/// Removes the `Authentication-Results` fields that claim to come from `authserv_id` (this
/// server): results a sender wrote itself must not pass for the host's (RFC 8601 section 5).
pub fn remove_forged_results(content: &[u8], authserv_id: &str) -> Vec<u8> {
    let (fields, header_end) = header_fields(content);
    let forged = |name: &str, raw: &[u8]| {
        name == "authentication-results"
            && String::from_utf8_lossy(raw)
                .split_once(':')
                .and_then(|(_, value)| {
                    value
                        .split([';', ' ', '\t', '\r', '\n'])
                        .find(|w| !w.is_empty())
                })
                .is_some_and(|id| id.eq_ignore_ascii_case(authserv_id))
    };
    if !fields.iter().any(|(name, raw)| forged(name, raw)) {
        return content.to_vec();
    }
    let mut kept = Vec::with_capacity(content.len());
    for (name, raw) in &fields {
        if !forged(name, raw) {
            kept.extend_from_slice(raw);
        }
    }
    kept.extend_from_slice(&content[header_end..]);
    kept
}

/// Applies the data hooks' recipient edits in chain order.
pub fn edit_recipients(recipients: &mut Vec<String>, edits: &[Edit]) {
    for edit in edits {
        match edit {
            Edit::AddRecipient(address) => {
                let valid = crate::smtp::address::parse_path_argument(&format!("<{address}>"))
                    .map(|parsed| parsed.mailbox.is_some())
                    .unwrap_or(false);
                if valid && !recipients.contains(address) {
                    recipients.push(address.clone());
                } else if !valid {
                    tracing::warn!(recipient = %crate::smtp::text::one_line(address), "plugin added an invalid recipient; ignored");
                }
            }
            Edit::RemoveRecipient(address) => {
                recipients.retain(|recipient| !recipient.eq_ignore_ascii_case(address))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_results_for_this_server_are_removed() {
        let message = b"Received: from x\r\nAuthentication-Results: mx.example.net;\r\n\tspf=pass\r\nAuthentication-Results: other.example; spf=fail\r\nSubject: s\r\n\r\nbody\r\n";
        let cleaned = remove_forged_results(message, "MX.example.net");
        assert_eq!(
            String::from_utf8_lossy(&cleaned),
            "Received: from x\r\nAuthentication-Results: other.example; spf=fail\r\nSubject: s\r\n\r\nbody\r\n"
        );
        let untouched: &[u8] = b"Subject: s\r\n\r\nb\r\n";
        assert_eq!(remove_forged_results(untouched, "mx"), untouched);
    }

    #[test]
    fn header_counting() {
        let content =
            b"Received: a\r\n\tb\r\nreceived: c\r\nSubject: x\r\n\r\nReceived: not a header\r\n";
        assert_eq!(count_headers(content, "Received"), 2);
        assert_eq!(count_headers(content, "Message-ID"), 0);
    }

    #[test]
    fn header_edits_in_chain_order() {
        use crate::plugins::bindings::types::Header;
        let header = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        let content = b"Received: x\r\nSubject: old\r\nX-Spam: yes\r\n\tcontinued\r\n\r\nbody\r\n";
        let edits = vec![
            Edit::AddHeader(header("X-First", "1")),
            Edit::RemoveHeader("x-spam".into()),
            Edit::ReplaceHeader(header("Subject", "new")),
            Edit::AddHeader(header("Bad", "a\r\nInjected: yes")),
        ];
        let edited = String::from_utf8(edit_headers(content, &edits)).expect("utf8");
        assert_eq!(
            edited,
            "X-First: 1\r\nSubject: new\r\nReceived: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn stamping_adds_message_id_once() {
        let trace = Trace {
            helo: "client.test",
            client_ip: "127.0.0.1".parse().expect("ip"),
            hostname: "mx.test",
            protocol: "ESMTP",
            tls: None,
            queue_id: "Q1",
            single_recipient: Some("b@example.com".into()),
        };
        let stamped = stamp(b"Subject: x\r\n\r\nhi\r\n".to_vec(), &trace);
        let text = String::from_utf8(stamped.clone()).expect("utf8");
        assert!(text.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Switchyard)\r\n\twith ESMTP id Q1\r\n\tfor <b@example.com>; "));
        assert!(text.contains("Message-ID: <Q1@mx.test>\r\n"));
        let again = stamp(stamped, &trace);
        assert_eq!(count_headers(&again, "Message-ID"), 1);
    }

    /// No header edit can start a field of its own or cut one with NUL; no added recipient can
    /// carry a line break.
    #[test]
    fn edits_with_control_characters_are_ignored() {
        use crate::plugins::bindings::types::Header;
        let header = |name: &str, value: &str| {
            Edit::AddHeader(Header {
                name: name.into(),
                value: value.into(),
            })
        };
        let content = b"Subject: s\r\n\r\nbody\r\n";
        let edits = vec![
            header("X-Nul", "a\0b"),
            header("X-Lf", "a\nInjected: yes"),
            header("X-Cr", "a\rb"),
            header("X-Esc", "\x1b[2J"),
            header("X\0Name", "v"),
            header("X-Name\r\nInjected", "v"),
            Edit::ReplaceHeader(Header {
                name: "Subject".into(),
                value: "new\r\nBcc: x@y.test".into(),
            }),
            header("X-Tab", "a\tb"),
        ];
        let edited = String::from_utf8(edit_headers(content, &edits)).expect("utf8");
        // A bad replacement is ignored whole: the field it would replace stays.
        assert_eq!(edited, "X-Tab: a\tb\r\nSubject: s\r\n\r\nbody\r\n");
        let mut recipients = vec!["a@b.test".to_string()];
        edit_recipients(
            &mut recipients,
            &[
                Edit::AddRecipient("c@d.test>\r\nRCPT TO:<e@f.test".into()),
                Edit::AddRecipient("g\0@h.test".into()),
                Edit::AddRecipient("i@j.test".into()),
            ],
        );
        assert_eq!(recipients, ["a@b.test", "i@j.test"]);
    }
}
