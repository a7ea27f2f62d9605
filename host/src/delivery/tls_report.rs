//! SMTP TLS reporting (RFC 8460): the TLS outcome of every delivery to a domain with an MTA-STS
//! policy, or to an MX host with DANE, is counted in the queue's database; a report per domain is built with mail-auth and
//! queued to the `rua` addresses of the domain's `_smtp._tls` record, every
//! `[tls_reports] interval` and on `switchyard tls-reports send`.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use mail_auth::report::tlsrpt::{
    DateRange, FailureDetails, Policy as ReportPolicy, PolicyDetails, PolicyType, ResultType,
    Summary, TlsReport,
};
use mail_parser::DateTime;

use super::client::ClientError;
use crate::config::Config;
use crate::net::dns::Dns;
use crate::queue::policies::{CountedOutcome, PolicyStore, TlsOutcome};
use crate::queue::{now_millis, MessageMeta, NewMessage, Queue, QueueError};

/// The RFC 8460 result type of a failed connection, when TLS is what failed.
pub fn result_type(error: &ClientError) -> Option<ResultType> {
    match error {
        ClientError::TlsRequired { .. } => Some(ResultType::StartTlsNotSupported),
        ClientError::Unverified { message, .. } => {
            // rustls' words for the certificate errors (its Display and Debug forms).
            let message = message.to_ascii_lowercase();
            let says = |phrases: &[&str]| phrases.iter().any(|phrase| message.contains(phrase));
            Some(if says(&["not valid for name", "notvalidforname"]) {
                ResultType::CertificateHostMismatch
            } else if says(&["expired"]) {
                ResultType::CertificateExpired
            } else if says(&["unknownissuer", "unknown issuer", "badsignature"]) {
                ResultType::CertificateNotTrusted
            } else {
                ResultType::ValidationFailure
            })
        }
        ClientError::Tls { .. } => Some(ResultType::ValidationFailure),
        _ => None,
    }
}

/// The name RFC 8460 gives a result type (`certificate-host-mismatch`...).
pub fn result_name(result: ResultType) -> String {
    serde_json::to_value(result)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_else(|| "validation-failure".to_string())
}

fn result_from_name(name: &str) -> ResultType {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .unwrap_or(ResultType::ValidationFailure)
}

/// Counts an outcome without holding up the delivery; a failure to count is logged.
pub fn count(store: &Arc<dyn PolicyStore>, outcome: TlsOutcome) {
    let store = store.clone();
    tokio::spawn(async move {
        if let Err(error) = store.count_tls_outcome(&outcome, now_millis()).await {
            tracing::warn!(domain = %outcome.domain, %error, "cannot count a TLS outcome for the TLS report");
        }
    });
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("building the report: {0}")]
    Build(String),
}

/// One report queued.
#[derive(Debug)]
pub struct Sent {
    pub domain: String,
    pub queue_id: String,
    pub to: Vec<String>,
}

/// Builds and queues a report for every domain with counted outcomes whose `_smtp._tls` record
/// names `mailto:` addresses; their counts are then forgotten. Domains without such a record
/// keep nothing: their counts are dropped too (nobody asked for them).
pub async fn send_reports(
    config: &Config,
    store: &dyn PolicyStore,
    queue: &dyn Queue,
    dns: &Dns,
) -> Result<Vec<Sent>, ReportError> {
    let counted = store.tls_outcomes().await?;
    let mut domains: Vec<&str> = counted.iter().map(|c| c.outcome.domain.as_str()).collect();
    domains.dedup();
    let mut sent = Vec::new();
    for domain in domains {
        let rows: Vec<CountedOutcome> = counted
            .iter()
            .filter(|c| c.outcome.domain == domain)
            .cloned()
            .collect();
        let to = match dns.txt(&format!("_smtp._tls.{domain}")).await {
            Ok(records) => report_addresses(&records),
            Err(error) => {
                // Kept for the next round: the record may be back by then.
                tracing::info!(%domain, %error, "TLS-RPT record lookup failed; the report waits");
                continue;
            }
        };
        if !to.is_empty() {
            let message = report_message(config, domain, &rows, &to)?;
            let queue_id = message.meta.id.clone();
            queue.enqueue(message, None).await?;
            tracing::info!(%domain, queue_id = %queue_id, to = ?to, "TLS report queued");
            sent.push(Sent {
                domain: domain.to_string(),
                queue_id,
                to,
            });
        }
        store.forget_tls_outcomes(&rows).await?;
    }
    Ok(sent)
}

/// The `mailto:` addresses of a `v=TLSRPTv1` record (RFC 8460 3); `https:` ones are not used.
pub fn report_addresses(records: &[String]) -> Vec<String> {
    let reporting: Vec<&String> = records
        .iter()
        .filter(|record| record.trim_start().starts_with("v=TLSRPTv1"))
        .collect();
    // More than one record means no reporting (RFC 8460 3).
    let [record] = reporting.as_slice() else {
        return Vec::new();
    };
    record
        .split(';')
        .filter_map(|field| field.trim().strip_prefix("rua="))
        .flat_map(|list| list.split(','))
        .filter_map(|uri| uri.trim().strip_prefix("mailto:"))
        // A mailto URI may carry `?subject=...`: the address is what comes before.
        .map(|address| address.split('?').next().unwrap_or_default())
        .filter(|address| {
            address.contains('@') && !address.contains(|c: char| c.is_whitespace() || c == '%')
        })
        .map(str::to_string)
        .collect()
}

/// The report for `domain` as a queued message to `to`.
fn report_message(
    config: &Config,
    domain: &str,
    rows: &[CountedOutcome],
    to: &[String],
) -> Result<NewMessage, ReportError> {
    let start = rows.iter().map(|row| row.first_at).min().unwrap_or(0);
    let end = rows.iter().map(|row| row.last_at).max().unwrap_or(start);
    let id = ulid::Ulid::new().to_string();
    let mut policies: Vec<ReportPolicy> = Vec::new();
    for row in rows {
        let outcome = &row.outcome;
        let sts = outcome.policy_type == "sts";
        let index = match policies.iter().position(|policy| {
            policy.policy.policy_string == policy_lines(&outcome.policy_text)
                && (policy.policy.policy_type == PolicyType::Sts) == sts
                && (sts || policy.policy.mx_host == [outcome.mx_host.clone()])
        }) {
            Some(index) => index,
            None => {
                policies.push(ReportPolicy {
                    policy: PolicyDetails {
                        // A DANE policy is the TLSA records of one MX host (RFC 8460 4.3.1).
                        policy_type: if sts {
                            PolicyType::Sts
                        } else {
                            PolicyType::Tlsa
                        },
                        policy_string: policy_lines(&outcome.policy_text),
                        policy_domain: domain.to_string(),
                        mx_host: if sts {
                            mx_patterns(&outcome.policy_text)
                        } else {
                            vec![outcome.mx_host.clone()]
                        },
                    },
                    summary: Summary {
                        total_success: 0,
                        total_failure: 0,
                    },
                    failure_details: Vec::new(),
                });
                policies.len() - 1
            }
        };
        let policy = &mut policies[index];
        let count = u32::try_from(row.count).unwrap_or(u32::MAX);
        if outcome.result == "success" {
            policy.summary.total_success = policy.summary.total_success.saturating_add(count);
            continue;
        }
        policy.summary.total_failure = policy.summary.total_failure.saturating_add(count);
        policy.failure_details.push(FailureDetails {
            result_type: result_from_name(&outcome.result),
            sending_mta_ip: None,
            receiving_mx_hostname: Some(outcome.mx_host.clone()),
            receiving_mx_helo: None,
            receiving_ip: outcome.receiving_ip.parse::<IpAddr>().ok(),
            failed_session_count: count,
            additional_information: (!outcome.reason.is_empty()).then(|| outcome.reason.clone()),
            failure_reason_code: None,
        });
    }
    let report = TlsReport {
        organization_name: Some(config.hostname.clone()),
        date_range: DateRange {
            start_datetime: DateTime::from_timestamp(start / 1000),
            end_datetime: DateTime::from_timestamp((end + 999) / 1000),
        },
        contact_info: Some(format!("postmaster@{}", config.hostname)),
        report_id: format!("{id}@{}", config.hostname),
        policies,
    };
    let from = format!("tlsrpt-noreply@{}", config.hostname);
    let text = report
        .to_rfc5322(
            domain,
            &config.hostname,
            from.as_str(),
            to.iter().map(String::as_str),
        )
        .map_err(|error| ReportError::Build(error.to_string()))?;
    let content = Bytes::from(text.replace("\r\n", "\n").replace('\n', "\r\n"));
    Ok(NewMessage {
        meta: MessageMeta {
            id,
            // Reports are never answered, nor bounced back (RFC 8460 5.3).
            sender: String::new(),
            received_at: now_millis(),
            size: content.len() as u64,
            smtputf8: false,
            eight_bit: content.iter().any(|&b| b >= 0x80),
            tenant: String::new(),
            dsn: Default::default(),
        },
        recipients: to.to_vec(),
        recipient_dsn: Vec::new(),
        content,
        quarantine: None,
    })
}

/// A policy file as the report's `policy-string`: its lines.
fn policy_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.trim_end_matches('\r').to_string())
        .filter(|line| !line.trim().is_empty())
        .collect()
}

fn mx_patterns(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("mx:"))
        .map(|mx| mx.trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rua_mailto_addresses() {
        let records = vec![
            "v=spf1 -all".to_string(),
            "v=TLSRPTv1; rua=mailto:a@x.test,https://r.x.test/report, mailto:b@x.test".to_string(),
        ];
        assert_eq!(report_addresses(&records), ["a@x.test", "b@x.test"]);
        assert!(report_addresses(&["v=TLSRPTv1;".to_string()]).is_empty());
        let two = vec![
            "v=TLSRPTv1; rua=mailto:a@x.test".to_string(),
            "v=TLSRPTv1; rua=mailto:b@x.test".to_string(),
        ];
        assert!(report_addresses(&two).is_empty());
        let query = vec!["v=TLSRPTv1; rua=mailto:a@x.test?subject=tls".to_string()];
        assert_eq!(report_addresses(&query), ["a@x.test"]);
    }

    #[test]
    fn result_type_names() {
        assert_eq!(
            result_name(ResultType::CertificateHostMismatch),
            "certificate-host-mismatch"
        );
        assert_eq!(
            result_from_name("starttls-not-supported"),
            ResultType::StartTlsNotSupported
        );
    }
}
