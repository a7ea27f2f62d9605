//! Sender authentication on inbound mail, with mail-auth through the host's resolver: SPF
//! (RFC 7208) of the envelope sender (or, for the null sender, of the HELO name), DKIM (RFC 6376)
//! signatures, the ARC chain (RFC 8617), and DMARC (RFC 7489) of the From domain; and the ARC
//! seal this hop adds when it is configured to. The results go to the data hook and into
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
    ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput,
    DmarcResult, MessageAuthenticator, SpfOutput, SpfResult,
};

/// The three results as the WIT `auth-results` spells them, and the header that records them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthVerdicts {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    /// The ARC chain the message arrived with (RFC 8617): `none`, `pass` or `fail`; in the
    /// header as `arc=`, where the data hook reads it.
    pub arc: String,
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
    let Some(message) = AuthenticatedMessage::parse(content) else {
        // No header section mail-auth can read: nothing to verify a signature or a From against.
        let (spf, results) = spf_only(&check).await;
        return AuthVerdicts {
            spf: spf_name(spf.result()).to_string(),
            dkim: "permerror".to_string(),
            dmarc: "permerror".to_string(),
            arc: "permerror".to_string(),
            header: results.to_header(),
        };
    };
    let verified = verify(&check, &message).await;
    AuthVerdicts {
        spf: spf_name(verified.spf.result()).to_string(),
        dkim: dkim_name(verified.dkim.iter().map(|output| output.result())).to_string(),
        dmarc: dmarc_name(&verified.dmarc.result()).to_string(),
        arc: dkim_name(std::iter::once(verified.arc.result())).to_string(),
        header: verified.results.to_header(),
    }
}

/// The ARC set that seals `sent` (RFC 8617), the message as it will go out (after the data
/// hooks' edits), with this hop's results and chain validation as they were on `arrived`, the
/// message as it came in: edits made here must not turn the results this hop vouches for into
/// failures. `None` when a message cannot be parsed or arrived with a broken chain (`cv=fail`),
/// which must not be sealed.
pub async fn seal(
    check: Check,
    arrived: &[u8],
    sent: &[u8],
    key: &crate::dkim::SigningKey,
) -> Result<Option<String>, String> {
    let (Some(arrived), Some(sent)) = (
        AuthenticatedMessage::parse(arrived),
        AuthenticatedMessage::parse(sent),
    ) else {
        return Ok(None);
    };
    let verified = verify(&check, &arrived).await;
    if !verified.arc.can_be_sealed() {
        return Ok(None);
    }
    key.seal(&sent, &verified.results, &verified.arc)
        .map(Some)
        .map_err(|error| error.to_string())
}

/// SPF of the envelope sender (or the HELO name), and the results it starts.
async fn spf_only(check: &Check) -> (SpfOutput, AuthenticationResults<'_>) {
    let client = &check.client;
    let spf = check
        .authenticator
        .verify_spf(SpfParameters::verify_mail_from(
            client.ip,
            &client.helo,
            &check.hostname,
            &client.sender,
        ))
        .await;
    let results = AuthenticationResults::new(&check.hostname).with_spf_mailfrom_result(
        &spf,
        client.ip,
        &client.sender,
        &client.helo,
    );
    (spf, results)
}

/// Every check's output on one message.
struct Verified<'m> {
    spf: SpfOutput,
    dkim: Vec<DkimOutput<'m>>,
    arc: ArcOutput<'m>,
    dmarc: DmarcOutput,
    results: AuthenticationResults<'m>,
}

async fn verify<'m>(check: &'m Check, message: &'m AuthenticatedMessage<'m>) -> Verified<'m> {
    let (spf, results) = spf_only(check).await;
    let client = &check.client;
    let mail_from_domain = client
        .sender
        .rsplit_once('@')
        .map_or(client.helo.as_str(), |(_, domain)| domain);
    let dkim = check.authenticator.verify_dkim(message).await;
    let arc = check.authenticator.verify_arc(message).await;
    let dmarc = check
        .authenticator
        .verify_dmarc(DmarcParameters::new(message, &dkim, mail_from_domain, &spf))
        .await;
    let results = results
        .with_dkim_results(&dkim, message.from())
        .with_arc_result(&arc, client.ip)
        .with_dmarc_result(&dmarc);
    Verified {
        spf,
        dkim,
        arc,
        dmarc,
        results,
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
