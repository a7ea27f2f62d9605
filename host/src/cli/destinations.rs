//! `switchyard queue list --by-destination` and `queue backoff`: delivery's destinations as the
//! running server sees them (rule, connections, rate, back-off), or, with no server answering,
//! the queued recipients counted by recipient domain.

use std::collections::BTreeMap;

use super::queue::clock;
use crate::admin::views::{BackoffView, DestinationView, MessageView};
use crate::mail::address::domain_key;

/// One line per destination, and one more for a back-off in force.
pub fn print(destinations: &[DestinationView]) {
    if destinations.is_empty() {
        println!("no destination has mail under way, a pace or a back-off");
    }
    for destination in destinations {
        let rule = destination.rule.as_deref().unwrap_or("[delivery]");
        let rate = match (destination.rate_allowed, &destination.rate_limit) {
            (Some(allowed), Some(limit)) => format!("rate={}/s (rule {limit})", number(allowed)),
            (Some(allowed), None) => format!("rate={}/s", number(allowed)),
            (None, _) => "rate=unlimited".to_string(),
        };
        let next = destination
            .next_slot
            .map(|at| format!("  next-slot={}", clock(at)))
            .unwrap_or_default();
        println!(
            "{}  rule={rule}  connections={}/{} ({} idle)  messages/connection={}  {rate}  sending={}/s{next}  waiting={} ({} recipients)",
            destination.destination,
            destination.connections_open,
            destination.connections_limit,
            destination.connections_idle,
            destination.messages_per_connection,
            number(destination.rate_sending),
            destination.waiting_messages,
            destination.waiting_recipients,
        );
        if let Some(backoff) = &destination.backoff {
            println!("    {}", summary(backoff));
        }
    }
}

/// The back-offs in force (of `only`, when given), each with the replies that caused it.
pub fn print_backoffs(destinations: &[DestinationView], only: Option<&str>) {
    let mut shown = 0;
    for destination in destinations {
        if only.is_some_and(|only| only != destination.destination) {
            continue;
        }
        let Some(backoff) = &destination.backoff else {
            continue;
        };
        shown += 1;
        println!("{}  {}", destination.destination, summary(backoff));
        println!(
            "    rule {}: rate {} when restored",
            destination.rule.as_deref().unwrap_or("[delivery]"),
            destination
                .rate_limit
                .as_deref()
                .unwrap_or("as sent before the back-off")
        );
        for reason in &backoff.reasons {
            println!("    reply: {reason}");
        }
    }
    if shown == 0 {
        match only {
            Some(only) => println!("no back-off in force for {only}"),
            None => println!("no back-off in force"),
        }
    }
}

fn summary(backoff: &BackoffView) -> String {
    format!(
        "BACKING OFF: level {} at {}/s since {}, next step back at {}, full rate at {} ({} slow-down replies)",
        backoff.level,
        number(backoff.rate),
        clock(backoff.began),
        clock(backoff.step_ends),
        clock(backoff.ends),
        backoff.triggers,
    )
}

/// No server answers: what is queued, by recipient domain (routes and relays are the
/// server's to decide, so this is not the destinations' view).
pub fn print_offline(messages: &[MessageView]) {
    let mut by_domain: BTreeMap<String, usize> = BTreeMap::new();
    for recipient in messages.iter().flat_map(|message| &message.recipients) {
        if matches!(recipient.state.as_str(), "queued" | "quarantined" | "held") {
            let domain = recipient.address.rsplit_once('@').map(|(_, d)| d);
            *by_domain
                .entry(domain_key(domain.unwrap_or_default()))
                .or_default() += 1;
        }
    }
    println!(
        "-- the server does not answer on its admin API: queued recipients by recipient domain \
         (no connections, rates or back-offs)"
    );
    for (domain, count) in by_domain {
        println!("{domain}  queued={count}");
    }
}

fn number(value: f64) -> String {
    format!("{value:.2}")
}
