//! rspamd's HTTP protocol: `POST /checkv2` with the message as the body and the envelope in
//! request headers (`From`, one `Rcpt` per recipient, `IP`, `Helo`, `User`, `Queue-Id`,
//! `MTA-Name`), answered with a JSON report (<https://rspamd.com/doc/developers/protocol.html>).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::clamav::printable;
use super::{stream, Envelope, RspamdVerdict, ScanError, Symbol};
use crate::config::Endpoint;

/// The largest report read: a report lists every symbol with its options, rarely 100 KiB.
const MAX_REPORT: usize = 4 * 1024 * 1024;

pub(super) async fn check(
    address: &Endpoint,
    envelope: &Envelope,
    content: Bytes,
) -> Result<RspamdVerdict, ScanError> {
    let connection = stream::connect(address).await?;
    let protocol = |error: hyper::Error| ScanError::Protocol(format!("HTTP with rspamd: {error}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(connection))
        .await
        .map_err(protocol)?;
    let request = request(envelope, content)?;
    let exchange = async {
        let response = sender.send_request(request).await.map_err(protocol)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_REPORT)
            .collect()
            .await
            .map_err(|error| ScanError::Protocol(format!("rspamd's report: {error}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(ScanError::Protocol(format!(
                "rspamd answered {status}: {}",
                printable(&String::from_utf8_lossy(&body))
            )));
        }
        parse_report(&body)
    };
    // The connection is driven in this task beside the exchange, not by a task of its own: it
    // ends when rspamd closes it after its answer (its normal worker does not keep connections),
    // and a failure of it reaches the exchange as an error. It is dropped, closed, with the
    // exchange: once the report is read, or when the scan's timeout gives up on it.
    let driven = async {
        let _ = connection.await;
        std::future::pending::<std::convert::Infallible>().await
    };
    tokio::select! {
        answered = exchange => answered,
        never = driven => match never {},
    }
}

fn request(envelope: &Envelope, content: Bytes) -> Result<hyper::Request<Full<Bytes>>, ScanError> {
    let mut request = hyper::Request::post("/checkv2")
        .header(hyper::header::HOST, "rspamd")
        .header(hyper::header::CONTENT_LENGTH, content.len())
        .body(Full::new(content))
        .map_err(|error| ScanError::Protocol(format!("request: {error}")))?;
    let headers = request.headers_mut();
    let mut add = |name: &'static str, value: &str| {
        // A value that cannot be a header field (a control character) is left out, not sent
        // broken: rspamd then judges without it.
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            headers.append(HeaderName::from_static(name), value);
        }
    };
    // The null sender as Postfix's milter protocol gives it, so rspamd sees a bounce.
    add(
        "from",
        if envelope.sender.is_empty() {
            "<>"
        } else {
            envelope.sender.as_str()
        },
    );
    for recipient in &envelope.recipients {
        add("rcpt", recipient);
    }
    if !envelope.client_ip.is_empty() {
        add("ip", &envelope.client_ip);
    }
    if let Some(helo) = &envelope.helo {
        add("helo", helo);
    }
    if let Some(user) = &envelope.auth_identity {
        add("user", user);
    }
    add("queue-id", &envelope.queue_id);
    add("mta-name", &envelope.hostname);
    Ok(request)
}

/// The verdict in rspamd's JSON report.
fn parse_report(body: &[u8]) -> Result<RspamdVerdict, ScanError> {
    let report: Value = serde_json::from_slice(body)
        .map_err(|error| ScanError::Protocol(format!("rspamd's report is not JSON: {error}")))?;
    let number = |key: &str| report.get(key).and_then(Value::as_f64);
    let (Some(score), Some(required_score), Some(action)) = (
        number("score"),
        number("required_score"),
        report.get("action").and_then(Value::as_str),
    ) else {
        let error = report
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no score, required_score or action");
        return Err(ScanError::Protocol(format!(
            "rspamd's report: {}",
            printable(error)
        )));
    };
    let mut symbols: Vec<Symbol> = report
        .get("symbols")
        .and_then(Value::as_object)
        .map(|symbols| {
            symbols
                .iter()
                .map(|(name, symbol)| Symbol {
                    name: name.clone(),
                    score: symbol.get("score").and_then(Value::as_f64).unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default();
    symbols.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.name.cmp(&b.name)));
    let message = report
        .pointer("/messages/smtp_message")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(RspamdVerdict {
        score,
        required_score,
        action: action.to_string(),
        symbols,
        message,
        headers: milter_headers(&report),
    })
}

/// `milter.add_headers`: each name maps to a value, an object with a `value`, or a list of
/// either (a header to add more than once).
fn milter_headers(report: &Value) -> Vec<(String, String)> {
    let Some(add) = report
        .pointer("/milter/add_headers")
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let value_of = |value: &Value| match value {
        Value::String(text) => Some(unfolded(text)),
        Value::Object(object) => object.get("value").and_then(Value::as_str).map(unfolded),
        _ => None,
    };
    let mut headers = Vec::new();
    for (name, value) in add {
        match value {
            Value::Array(values) => headers.extend(
                values
                    .iter()
                    .filter_map(value_of)
                    .map(|v| (name.clone(), v)),
            ),
            value => headers.extend(value_of(value).map(|v| (name.clone(), v))),
        }
    }
    headers
}

/// A header value on one line, as `body.headers` gives them: rspamd folds long ones
/// (`X-Spamd-Result` lists a symbol per line); line breaks go, tabs become spaces.
fn unfolded(value: &str) -> String {
    value
        .replace(['\r', '\n'], "")
        .replace('\t', " ")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_gives_score_action_symbols_message_and_headers() {
        let report = br#"{"is_skipped":false,"score":1001.5,"required_score":15.0,"action":"reject",
            "symbols":{"GTUBE":{"name":"GTUBE","score":0.0},"BIG":{"name":"BIG","score":1001.5}},
            "messages":{"smtp_message":"Gtube pattern"},
            "milter":{"add_headers":{"X-Spamd-Result":{"value":"default: True [1001.50 / 15.00];\r\n\tGTUBE(0.00)","order":0},
                "X-Two":["a",{"value":"b"}]}}}"#;
        let verdict = parse_report(report).expect("report");
        assert_eq!(verdict.action, "reject");
        assert_eq!(verdict.score, 1001.5);
        assert_eq!(verdict.required_score, 15.0);
        assert_eq!(verdict.symbols[0].name, "BIG");
        assert_eq!(verdict.message.as_deref(), Some("Gtube pattern"));
        assert!(verdict.headers.contains(&(
            "X-Spamd-Result".to_string(),
            "default: True [1001.50 / 15.00]; GTUBE(0.00)".to_string()
        )));
        assert!(verdict
            .headers
            .contains(&("X-Two".to_string(), "b".to_string())));
    }

    #[test]
    fn a_report_without_a_verdict_is_an_error() {
        let error = parse_report(br#"{"error":"Message is empty"}"#).expect_err("error");
        assert_eq!(
            error,
            ScanError::Protocol("rspamd's report: Message is empty".to_string())
        );
        assert!(parse_report(b"<html>").is_err());
    }
}
