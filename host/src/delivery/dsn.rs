//! Delivery status notifications (RFC 3464): the bounce sent to the envelope sender when
//! recipients fail. The host builds the whole structure; the human-readable part is the one piece
//! the bounce plugin hook will be able to replace.

use bytes::Bytes;

use crate::mail::dsn_params::{xtext_decode, Ret};
use crate::plugins::bindings::types::BounceText;
use crate::queue::{now_millis, MessageMeta, Millis, NewMessage};

/// What a DSN says happened to a recipient (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    /// Not delivered yet, still being tried.
    Delayed,
    /// Into a mailbox here.
    Delivered,
    /// Handed to a next hop that does not report on it (no DSN extension).
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient a DSN reports on.
#[derive(Debug, Clone)]
pub struct DsnRecipient {
    pub address: String,
    pub action: Action,
    /// The RFC 3463 status, such as "5.1.1".
    pub status: String,
    /// The remote server's reply (or ours), one line.
    pub diagnostic: String,
    /// The host that gave the reply, if a remote one did.
    pub remote_mta: Option<String>,
    /// RCPT's ORCPT as given (`rfc822;address` in xtext).
    pub orcpt: Option<String>,
}

/// The kind of a DSN: all its recipients share their action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Failure,
    /// Delivery is still being tried until this time.
    Delay {
        retry_until: Millis,
    },
    Success,
}

/// Builds the DSN for `recipients` of a message. `None` when the message came from the null
/// sender: a bounce is never bounced (RFC 5321 4.5.5). `custom` replaces the subject and the
/// human-readable part (the bounce hook's answer, for failures). A failure report returns the
/// whole message when the sender asked for it (RET=FULL), else its header section; other
/// reports return the header section (RFC 3461 4.3).
pub fn build(
    hostname: &str,
    original: &MessageMeta,
    content: &[u8],
    recipients: &[DsnRecipient],
    report: Report,
    custom: Option<&BounceText>,
) -> Option<NewMessage> {
    if original.sender.is_empty() || recipients.is_empty() {
        return None;
    }
    let id = ulid::Ulid::new().to_string();
    let now = chrono::Utc::now();
    let date = now.format("%a, %d %b %Y %H:%M:%S +0000").to_string();
    let format_time = |millis: Millis| {
        chrono::DateTime::from_timestamp_millis(millis)
            .unwrap_or(now)
            .format("%a, %d %b %Y %H:%M:%S +0000")
            .to_string()
    };
    let arrival = format_time(original.received_at);
    let boundary = format!("{id}/{hostname}");
    let default_subject = match report {
        Report::Failure => "Undelivered Mail Returned to Sender",
        Report::Delay { .. } => "Delayed Mail (still being retried)",
        Report::Success => "Successful Mail Delivery Report",
    };
    let subject = custom
        .map(|custom| crate::mail::text::one_line(&custom.subject).into_owned())
        .unwrap_or_else(|| default_subject.to_string());
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
    text.push_str(&notification(hostname, recipients, report, custom));
    text.push_str("\r\n");
    text.push_str(&format!("--{boundary}\r\n"));
    text.push_str(
        "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
    );
    let retry_until = match report {
        Report::Delay { retry_until } => Some(format_time(retry_until)),
        _ => None,
    };
    text.push_str(&delivery_status(
        hostname,
        original,
        recipients,
        &arrival,
        &date,
        retry_until.as_deref(),
    ));
    text.push_str("\r\n");

    // RFC 8689 5: the report of a REQUIRETLS message is redacted (none of the original comes
    // back), so it may travel without REQUIRETLS.
    let full = report == Report::Failure && original.dsn.ret == Some(Ret::Full);
    let mut message = if original.dsn.requiretls {
        text.into_bytes()
    } else if full {
        text.push_str(&format!("--{boundary}\r\n"));
        text.push_str(
            "Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n\r\n",
        );
        let mut message = text.into_bytes();
        message.extend_from_slice(content);
        if !content.ends_with(b"\r\n") {
            message.extend_from_slice(b"\r\n");
        }
        message
    } else {
        let description = match report {
            Report::Failure => "Undelivered Message Headers",
            _ => "Message Headers",
        };
        text.push_str(&format!("--{boundary}\r\n"));
        text.push_str(&format!(
            "Content-Description: {description}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        ));
        let mut message = text.into_bytes();
        message.extend_from_slice(crate::mail::header::section(content));
        message
    };
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
            dsn: Default::default(),
        },
        recipients: vec![original.sender.clone()],
        recipient_dsn: Vec::new(),
        content: Bytes::from(message),
        quarantine: None,
    })
}

/// The human-readable part: the bounce hook's text, or the host's own words.
fn notification(
    hostname: &str,
    recipients: &[DsnRecipient],
    report: Report,
    custom: Option<&BounceText>,
) -> String {
    let Some(custom) = custom else {
        let opening = match report {
            Report::Failure => {
                "I'm sorry to have to inform you that your message could not\r\n\
                 be delivered to one or more recipients. It's attached below.\r\n"
            }
            Report::Delay { .. } => {
                "####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######\r\n\r\n\
                 Your message could not be delivered yet to one or more recipients.\r\n\
                 It will be tried again until the time given below.\r\n"
            }
            Report::Success => {
                "Your message was successfully delivered to the destination(s)\r\n\
                 listed below. If the message was relayed to another system, you may\r\n\
                 still receive notifications of mail delivery errors from it.\r\n"
            }
        };
        let mut text = format!("This is the mail system at host {hostname}.\r\n\r\n{opening}\r\n");
        for recipient in recipients {
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
    recipients: &[DsnRecipient],
    arrival: &str,
    date: &str,
    retry_until: Option<&str>,
) -> String {
    let mut text = format!("Reporting-MTA: dns; {hostname}\r\n");
    if let Some(envid) = &original.dsn.envid {
        text.push_str(&format!(
            "Original-Envelope-Id: {}\r\n",
            xtext_decode(envid)
        ));
    }
    text.push_str(&format!(
        "X-Switchyard-Queue-ID: {}\r\nArrival-Date: {arrival}\r\n",
        original.id
    ));
    for recipient in recipients {
        let address_type = if recipient.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        text.push('\r');
        text.push('\n');
        if let Some((kind, address)) = recipient.orcpt.as_deref().and_then(|o| o.split_once(';')) {
            text.push_str(&format!(
                "Original-Recipient: {kind};{}\r\n",
                xtext_decode(address)
            ));
        }
        text.push_str(&format!(
            "Final-Recipient: {address_type}; {}\r\nAction: {}\r\nStatus: {}\r\n",
            recipient.address,
            recipient.action.as_str(),
            recipient.status
        ));
        if let Some(remote) = &recipient.remote_mta {
            text.push_str(&format!("Remote-MTA: dns; {remote}\r\n"));
        }
        text.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {date}\r\n",
            recipient.diagnostic
        ));
        if let Some(until) = retry_until {
            text.push_str(&format!("Will-Retry-Until: {until}\r\n"));
        }
    }
    text
}

/// The RFC 3463 status for a reply: its enhanced code, or one derived from the basic code.
pub fn status_of(code: u16, enhanced: &str) -> String {
    if !enhanced.is_empty() {
        enhanced.to_string()
    } else if code < 400 {
        "2.0.0".to_string()
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
            dsn: Default::default(),
        }
    }

    #[test]
    fn never_bounce_a_bounce() {
        let failed = [DsnRecipient {
            address: "b@x.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            remote_mta: None,
            action: Action::Failed,
            orcpt: None,
        }];
        assert!(build(
            "mx.test",
            &meta(""),
            b"Subject: x\r\n\r\nbody\r\n",
            &failed,
            Report::Failure,
            None
        )
        .is_none());
        let dsn = build(
            "mx.test",
            &meta("a@y.test"),
            b"Subject: x\r\n\r\nbody\r\n",
            &failed,
            Report::Failure,
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
        let failed = [DsnRecipient {
            address: "b@x.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            remote_mta: None,
            action: Action::Failed,
            orcpt: None,
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
            Report::Failure,
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

    #[test]
    fn ret_full_envid_and_orcpt_and_the_other_reports() {
        let mut original = meta("a@y.test");
        original.dsn.ret = Some(Ret::Full);
        original.dsn.envid = Some("QQ+2B1".into());
        let recipient = |action| DsnRecipient {
            address: "b@x.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            remote_mta: Some("mx.x.test[192.0.2.1]:25".into()),
            action,
            orcpt: Some("rfc822;B+40x.test".into()),
        };
        let content = b"Subject: x\r\n\r\nthe body\r\n";
        let text = |report, action| {
            let dsn = build(
                "mx.test",
                &original,
                content,
                &[recipient(action)],
                report,
                None,
            )
            .expect("dsn");
            String::from_utf8(dsn.content.to_vec()).expect("utf8")
        };
        let failure = text(Report::Failure, Action::Failed);
        assert!(
            failure.contains("Original-Envelope-Id: QQ+1\r\n"),
            "{failure}"
        );
        assert!(failure.contains("Original-Recipient: rfc822;B@x.test\r\nFinal-Recipient: rfc822; b@x.test\r\nAction: failed\r\n"));
        assert!(
            failure.contains("Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nthe body\r\n")
        );
        let delay = text(Report::Delay { retry_until: 0 }, Action::Delayed);
        assert!(delay.contains("Subject: Delayed Mail (still being retried)"));
        assert!(delay.contains("Action: delayed\r\n"));
        assert!(delay.contains("Will-Retry-Until: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
        assert!(
            !delay.contains("the body"),
            "a delay report returns the headers only"
        );
        let success = text(Report::Success, Action::Relayed);
        assert!(success.contains("Action: relayed\r\n"));
        assert!(success.contains("Subject: Successful Mail Delivery Report"));
    }
}
