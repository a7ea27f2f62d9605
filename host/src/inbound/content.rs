//! The host's own work on a message's content once received (see `data_reader.rs` for reading
//! it): the `Received:` and `Message-ID:` it adds, and forged authentication results it removes.

use crate::mail::header;

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
    if header::count(&content, "Message-ID") == 0 {
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

/// Removes the `Authentication-Results` fields that claim to come from `authserv_id` (this
/// server): results a sender wrote itself must not pass for the host's (RFC 8601 section 5).
pub fn remove_forged_results(content: &[u8], authserv_id: &str) -> Vec<u8> {
    let (fields, header_end) = header::fields(content);
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
        assert_eq!(header::count(&again, "Message-ID"), 1);
    }
}
