//! Sender authentication on inbound mail, with mail-auth through the host's resolver: SPF
//! (RFC 7208) of the envelope sender (or, for the null sender, of the HELO name), DKIM (RFC 6376)
//! signatures, and DMARC (RFC 7489) of the From domain. The results go to the data hook and into
//! an `Authentication-Results` header (RFC 8601) at the top of the message.
//!
//! Only mail from outside `relay.networks` on inbound listeners is checked: mail from the
//! operator's own networks and from submission clients is not the internet's to vouch for, as in
//! Postfix's `permit_mynetworks` before its policy checks.

use std::net::IpAddr;

use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};

/// The three results as the WIT `auth-results` spells them, and the header that records them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthVerdicts {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    /// `Authentication-Results: ...\r\n`, to prepend to the message.
    pub header: String,
}

/// What a check needs of the session, taken before it starts (a session is not `Sync`, so the
/// check must not borrow it across its DNS lookups).
pub struct Check {
    pub authenticator: MessageAuthenticator,
    /// This server's name, the authserv-id of the header.
    pub hostname: String,
    pub client: Client,
}

/// What is known of the client when its message ends.
pub struct Client {
    pub ip: IpAddr,
    pub helo: String,
    /// The envelope sender, "" for the null sender.
    pub sender: String,
}

pub async fn authenticate(check: Check, content: &[u8]) -> AuthVerdicts {
    let Check {
        authenticator,
        hostname,
        client,
    } = check;
    let (hostname, helo, sender) = (
        hostname.as_str(),
        client.helo.as_str(),
        client.sender.as_str(),
    );
    let spf = authenticator
        .verify_spf(SpfParameters::verify_mail_from(
            client.ip, helo, hostname, sender,
        ))
        .await;
    let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, domain)| domain);
    let results = AuthenticationResults::new(hostname)
        .with_spf_mailfrom_result(&spf, client.ip, sender, helo);
    let Some(message) = AuthenticatedMessage::parse(content) else {
        // No header section mail-auth can read: nothing to verify a signature or a From against.
        return AuthVerdicts {
            spf: spf_name(spf.result()).to_string(),
            dkim: "permerror".to_string(),
            dmarc: "permerror".to_string(),
            header: results.to_header(),
        };
    };
    let dkim = authenticator.verify_dkim(&message).await;
    let dmarc = authenticator
        .verify_dmarc(DmarcParameters::new(
            &message,
            &dkim,
            mail_from_domain,
            &spf,
        ))
        .await;
    let header = results
        .with_dkim_results(&dkim, message.from())
        .with_dmarc_result(&dmarc)
        .to_header();
    AuthVerdicts {
        spf: spf_name(spf.result()).to_string(),
        dkim: dkim_name(dkim.iter().map(|output| output.result())).to_string(),
        dmarc: dmarc_name(&dmarc.result()).to_string(),
        header,
    }
}

fn spf_name(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// The best result over a message's signatures: one passing signature is a pass.
fn dkim_name<'a>(results: impl Iterator<Item = &'a DkimResult>) -> &'static str {
    let mut best = "none";
    for result in results {
        let name = match result {
            DkimResult::Pass => return "pass",
            DkimResult::Neutral(_) => "neutral",
            DkimResult::Fail(_) => "fail",
            DkimResult::PermError(_) => "permerror",
            DkimResult::TempError(_) => "temperror",
            DkimResult::None => "none",
        };
        // A verdict that says something beats "none"; the first such verdict is kept.
        if best == "none" {
            best = name;
        }
    }
    best
}

fn dmarc_name(result: &DmarcResult) -> &'static str {
    match result {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_passing_signature_is_a_pass() {
        let fail = DkimResult::Fail(mail_auth::Error::ParseError);
        assert_eq!(dkim_name([&fail, &DkimResult::Pass].into_iter()), "pass");
        assert_eq!(dkim_name([&fail].into_iter()), "fail");
        assert_eq!(dkim_name(std::iter::empty()), "none");
    }
}
