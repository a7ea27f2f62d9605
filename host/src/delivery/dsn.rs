//! Delivery status notifications (RFC 3464): the bounce sent to the envelope sender when
//! recipients fail. The host builds the whole structure; the human-readable part is the one piece
//! the bounce plugin hook will be able to replace.

use bytes::Bytes;

use crate::plugins::bindings::types::BounceText;
use crate::queue::{now_millis, MessageMeta, NewMessage};

/// One recipient that failed, and why.
#[derive(Debug, Clone)]
pub struct FailedRecipient {
    pub address: String,
    /// The RFC 3463 status, such as "5.1.1".
    pub status: String,
    /// The remote server's reply (or ours), one line.
    pub diagnostic: String,
    /// The host that gave the reply, if a remote one did.
    pub remote_mta: Option<String>,
}

/// Builds the DSN for `failed` recipients of a message. `None` when the message came from the
/// null sender: a bounce is never bounced (RFC 5321 4.5.5). `custom` replaces the subject and
/// the human-readable part (the bounce hook's answer).
pub fn build(
    hostname: &str,
    original: &MessageMeta,
    content: &[u8],
    failed: &[FailedRecipient],
    custom: Option<&BounceText>,
) -> Option<NewMessage> {
    if original.sender.is_empty() || failed.is_empty() {
        return None;
    }
    let id = ulid::Ulid::new().to_string();
    let now = chrono::Utc::now();
    let date = now.format("%a, %d %b %Y %H:%M:%S +0000").to_string();
    let arrival = chrono::DateTime::from_timestamp_millis(original.received_at)
        .unwrap_or(now)
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string();
    let boundary = format!("{id}/{hostname}");
    let subject = custom
        .map(|custom| crate::mail::text::one_line(&custom.subject).into_owned())
        .unwrap_or_else(|| "Undelivered Mail Returned to Sender".to_string());
    let mut text = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\nThis is a MIME-encapsulated message.\r\n\r\n",
        sender = original.sender,
    );
    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str(
        "Content-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    text.push_str(&notification(hostname, failed, custom));
    text.push_str("\r\n");
    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str(
        "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
    );
    text.push_str(&delivery_status(
        hostname, original, failed, &arrival, &date,
    ));
    text.push_str("\r\n");

    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str("Content-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n");
    let mut message = text.into_bytes();
    message.extend_from_slice(crate::mail::header::section(content));
    message.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let eight_bit = message.iter().any(|&b| b >= 0x80);
    Some(NewMessage {
        meta: MessageMeta {
            id,
            sender: String::new(),
            received_at: now_millis(),
            size: message.len() as u64,
            smtputf8: !original.sender.is_ascii(),
            eight_bit,
            // The bounce is the tenant's mail too: its bounce and delivery hooks, its quota.
            tenant: original.tenant.clone(),
        },
        recipients: vec![original.sender.clone()],
        content: Bytes::from(message),
        quarantine: None,
    })
}

/// The human-readable part: the bounce hook's text, or the host's own words.
fn notification(hostname: &str, failed: &[FailedRecipient], custom: Option<&BounceText>) -> String {
    let Some(custom) = custom else {
        let mut text = format!(
            "This is the mail system at host {hostname}.\r\n\r\n\
             I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n"
        );
        for recipient in failed {
            text.push_str(&format!(
                "<{}>: {}\r\n",
                recipient.address, recipient.diagnostic
            ));
        }
        return text;
    };
    // Normalised to CRLF, other control characters (NUL...) to spaces: a DSN is held to the
    // same rules as what we accept.
    let mut body = custom
        .text
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .split('\n')
        .map(crate::mail::text::one_line)
        .collect::<Vec<_>>()
        .join("\r\n");
    if !body.ends_with("\r\n") {
        body.push_str("\r\n");
    }
    body
}

/// The machine-readable part (RFC 3464): the message's fields, then one block per recipient.
fn delivery_status(
    hostname: &str,
    original: &MessageMeta,
    failed: &[FailedRecipient],
    arrival: &str,
    date: &str,
) -> String {
    let mut text = format!(
        "Reporting-MTA: dns; {hostname}\r\n\
         X-Switchyard-Queue-ID: {}\r\n\
         Arrival-Date: {arrival}\r\n",
        original.id
    );
    for recipient in failed {
        let address_type = if recipient.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        text.push_str(&format!(
            "\r\nFinal-Recipient: {address_type}; {}\r\nAction: failed\r\nStatus: {}\r\n",
            recipient.address, recipient.status
        ));
        if let Some(remote) = &recipient.remote_mta {
            text.push_str(&format!("Remote-MTA: dns; {remote}\r\n"));
        }
        text.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {date}\r\n",
            recipient.diagnostic
        ));
    }
    text
}

/// The RFC 3463 status for a reply: its enhanced code, or one derived from the basic code.
pub fn status_of(code: u16, enhanced: &str) -> String {
    if !enhanced.is_empty() {
        enhanced.to_string()
    } else if code >= 500 {
        "5.0.0".to_string()
    } else {
        "4.0.0".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(sender: &str) -> MessageMeta {
        MessageMeta {
            id: "Q1".into(),
            sender: sender.into(),
            received_at: 0,
            size: 10,
            smtputf8: false,
            eight_bit: false,
            tenant: String::new(),
        }
    }

    #[test]
    fn never_bounce_a_bounce() {
        let failed = [FailedRecipient {
            address: "b@x.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            remote_mta: None,
        }];
        assert!(build(
            "mx.test",
            &meta(""),
            b"Subject: x\r\n\r\nbody\r\n",
            &failed,
            None
        )
        .is_none());
        let dsn = build(
            "mx.test",
            &meta("a@y.test"),
            b"Subject: x\r\n\r\nbody\r\n",
            &failed,
            None,
        )
        .expect("dsn");
        assert_eq!(dsn.meta.sender, "");
        assert_eq!(dsn.recipients, vec!["a@y.test".to_string()]);
        let text = String::from_utf8(dsn.content.to_vec()).expect("utf8");
        assert!(text
            .contains("Final-Recipient: rfc822; b@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"));
        assert!(text.contains("Subject: x\r\n"));
        assert!(
            !text.contains("body"),
            "only the headers of the original are returned"
        );
    }

    /// A bounce plugin's subject and text cannot add header fields or carry NUL into the DSN.
    #[test]
    fn plugin_text_stays_in_its_place() {
        let failed = [FailedRecipient {
            address: "b@x.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            remote_mta: None,
        }];
        let custom = BounceText {
            subject: "Oops\r\nBcc: everyone@x.test\0".into(),
            text: "line one\nline\0two\r.\r\n".into(),
        };
        let dsn = build(
            "mx.test",
            &meta("a@y.test"),
            b"Subject: x\r\n\r\n",
            &failed,
            Some(&custom),
        )
        .expect("dsn");
        let text = String::from_utf8(dsn.content.to_vec()).expect("utf8");
        assert!(
            text.contains("Subject: Oops  Bcc: everyone@x.test \r\n"),
            "{text}"
        );
        assert!(!text.contains("\r\nBcc:"));
        assert!(text.contains("line one\r\nline two\r\n.\r\n"), "{text}");
        assert!(!text.contains('\0'));
    }
}
