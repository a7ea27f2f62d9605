//! SIGTERM under load: listeners close at once, every session gets an answer (its message's 250
//! or a 421), deliveries under way finish within the drain time, and nothing is lost or sent
//! twice: what was left in the queue goes out after the restart, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::client::{message, TestClient};
use crate::harness::router::{Router, RouterOptions};
use crate::harness::sink::Sink;

/// What became of one message a load client tried to send.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// 250 to its DATA: the router owes its delivery.
    Accepted,
    /// A 4xx or 5xx answer: the client keeps it.
    Refused(u16),
    /// A command got no answer at all: what a stop must never do to a session.
    Unanswered(String),
}

/// Reads one reply, or the reason there was none.
async fn answer(client: &mut TestClient) -> Result<u16, String> {
    match tokio::time::timeout(Duration::from_secs(30), client.reply_checked()).await {
        Ok(Some(reply)) => Ok(reply.code),
        Ok(None) => Err("connection closed without a reply".to_string()),
        Err(_) => Err("no reply within 30 s".to_string()),
    }
}

/// Sends one message, command by command, and says what became of it.
async fn send_one(client: &mut TestClient, subject: &str) -> Fate {
    let steps: [(String, u16); 3] = [
        ("MAIL FROM:<load@sender.test>\r\n".to_string(), 250),
        ("RCPT TO:<b@switchyard.test>\r\n".to_string(), 250),
        ("DATA\r\n".to_string(), 354),
    ];
    for (command, wanted) in steps {
        if client.try_send(command.as_bytes()).await.is_err() {
            return Fate::Unanswered(format!("cannot send {command:?}"));
        }
        match answer(client).await {
            Ok(code) if code == wanted => {}
            Ok(code) => return Fate::Refused(code),
            Err(reason) => return Fate::Unanswered(format!("{command:?}: {reason}")),
        }
    }
    let content = format!("{}.\r\n", message(subject));
    if client.try_send(content.as_bytes()).await.is_err() {
        return Fate::Unanswered("cannot send the content".to_string());
    }
    match answer(client).await {
        Ok(250) => Fate::Accepted,
        Ok(code) => Fate::Refused(code),
        Err(reason) => Fate::Unanswered(format!("end of data: {reason}")),
    }
}

/// Messages one load client sends at most; with a pause between them, the load lasts well past
/// the stop while the queue it leaves stays small enough to deliver quickly after the restart.
const MESSAGES_PER_CLIENT: usize = 80;

/// One load client: sessions of up to five messages each, until the router stops answering
/// with a session (a 421, or no listener).
async fn load(port: u16, client_number: usize, fates: Arc<Mutex<HashMap<String, Fate>>>) {
    let note = |what: String, fate: Fate| {
        fates.lock().expect("fates").insert(what, fate);
    };
    let mut number = 0;
    while number < MESSAGES_PER_CLIENT {
        let Some(mut client) = TestClient::try_connect_raw(port).await else {
            return; // The listener is closed.
        };
        // A greeting, or a 421 from a listener that stops: never a connection dropped without a
        // word (the router answers what waits in its backlog).
        for (what, command, wanted) in [
            ("greeting", None, 220),
            ("EHLO", Some("EHLO load.test\r\n"), 250),
        ] {
            if let Some(command) = command {
                client.send(command.as_bytes()).await;
            }
            match answer(&mut client).await {
                Ok(code) if code == wanted => {}
                Ok(_) => return,
                Err(reason) => {
                    note(
                        format!("{what} {client_number}-{number}"),
                        Fate::Unanswered(reason),
                    );
                    return;
                }
            }
        }
        for _ in 0..5 {
            number += 1;
            let subject = format!("load {client_number}-{number}");
            let fate = send_one(&mut client, &subject).await;
            let stop = fate != Fate::Accepted;
            note(subject, fate);
            if stop {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = client.try_send(b"QUIT\r\n").await;
        if let Err(reason) = answer(&mut client).await {
            note(
                format!("QUIT {client_number}-{number}"),
                Fate::Unanswered(reason),
            );
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_session_and_loses_or_repeats_nothing() {
    // Each delivery takes 200 ms at the sink, so deliveries are under way when the stop comes.
    let sink = Sink::start_slow(
        "127.0.0.1".parse().expect("ip"),
        0,
        None,
        Duration::from_millis(200),
    )
    .await;
    let mut router = Router::start(RouterOptions {
        extra: "[shutdown]\ndrain_timeout = \"20s\"\n".to_string(),
        ..RouterOptions::relaying_to(sink.address, "max_connections_per_destination = 16\n")
    })
    .await;
    let fates = Arc::new(Mutex::new(HashMap::new()));
    let clients: Vec<_> = (0..8)
        .map(|n| tokio::spawn(load(router.port, n, fates.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let accepted_before_stop = fates
        .lock()
        .expect("fates")
        .values()
        .filter(|fate| **fate == Fate::Accepted)
        .count();
    assert!(
        accepted_before_stop > 10,
        "the load is running: {accepted_before_stop} accepted"
    );
    router.terminate();
    let (status, took) = router.wait_exit(Duration::from_secs(25)).await;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        router.log()
    );
    for client in clients {
        client.await.expect("load client");
    }
    let fates = fates.lock().expect("fates").clone();
    let unanswered: Vec<_> = fates
        .iter()
        .filter(|(_, fate)| matches!(fate, Fate::Unanswered(_)))
        .collect();
    assert!(
        unanswered.is_empty(),
        "sessions left without an answer: {unanswered:?}"
    );
    let refused: Vec<_> = fates
        .values()
        .filter_map(|fate| match fate {
            Fate::Refused(code) => Some(*code),
            _ => None,
        })
        .collect();
    assert!(
        refused.iter().all(|&code| code == 421),
        "a stop answers 421, nothing else: {refused:?}"
    );
    let log = router.log();
    assert!(
        log.contains("stopped: every session and delivery finished"),
        "drained within {took:?}; log:\n{log}"
    );

    // Nothing twice so far, and after a restart everything accepted arrives, once.
    let count = |received: &[crate::harness::sink::Received]| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for message in received {
            let subject = message
                .data
                .lines()
                .find_map(|line| line.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_string();
            *counts.entry(subject).or_default() += 1;
        }
        counts
    };
    let before_restart = count(&sink.received());
    assert!(
        before_restart.values().all(|&n| n == 1),
        "duplicates before the restart: {before_restart:?}"
    );
    let accepted: Vec<&String> = fates
        .iter()
        .filter(|(_, fate)| **fate == Fate::Accepted)
        .map(|(subject, _)| subject)
        .collect();
    router.spawn().await;
    sink.wait_for(accepted.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let delivered = count(&sink.received());
    for subject in &accepted {
        assert_eq!(
            delivered.get(*subject),
            Some(&1),
            "{subject}: accepted, so delivered exactly once"
        );
    }
    assert_eq!(
        delivered.len(),
        accepted.len(),
        "only accepted messages were delivered"
    );
    eprintln!(
        "stop took {took:?}: {} accepted ({} delivered before the stop), {} answered 421",
        accepted.len(),
        before_restart.len(),
        refused.len()
    );
}

/// A delivery that outlasts the drain time is cut when the time is over, and a second signal
/// cuts it at once; either way the message stays in the queue and goes out after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_time_and_a_second_signal_bound_the_stop() {
    for second_signal in [false, true] {
        // The sink holds each message's end of DATA for 2 s: the delivery is under way at the stop.
        let sink = Sink::start_slow(
            "127.0.0.1".parse().expect("ip"),
            0,
            None,
            Duration::from_secs(2),
        )
        .await;
        let drain = if second_signal { "60s" } else { "500ms" };
        let mut router = Router::start(RouterOptions {
            extra: format!("[shutdown]\ndrain_timeout = \"{drain}\"\n"),
            ..RouterOptions::relaying_to(sink.address, "")
        })
        .await;
        let mut client = TestClient::connect(router.port).await;
        client
            .send_accepted("a@sender.test", &["b@switchyard.test"], &message("slow"))
            .await;
        // Wait until the delivery has reached the sink's DATA.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.connections().open == 0 {
            assert!(std::time::Instant::now() < deadline, "no delivery started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A client in the middle of its message's content when the stop comes, which never
        // finishes it: it is told 421 when the drain time is over.
        let mut stalled = TestClient::connect(router.port).await;
        assert_eq!(stalled.command("MAIL FROM:<a@sender.test>").await.code, 250);
        assert_eq!(
            stalled.command("RCPT TO:<b@switchyard.test>").await.code,
            250
        );
        assert_eq!(stalled.command("DATA").await.code, 354);
        stalled.send(b"Subject: never finished\r\n").await;
        router.terminate();
        if second_signal {
            tokio::time::sleep(Duration::from_millis(300)).await;
            router.terminate();
        }
        let (status, took) = router.wait_exit(Duration::from_secs(3)).await;
        assert!(status.success(), "{status}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let expected = if second_signal {
            "stopped at once on a second signal"
        } else {
            "stopped at the end of the drain time"
        };
        assert!(router.log().contains(expected), "{}", router.log());
        // The idle session was told at once, the stalled one when its time was up.
        let shutting_down = "421 4.3.2 mx.switchyard.test Service shutting down, try again later";
        for session in [&mut client, &mut stalled] {
            assert_eq!(
                session.reply_checked().await.map(|reply| reply.text),
                Some(shutting_down.to_string())
            );
        }
        // The cut attempt never got its 250, so the router sends the message again after the
        // restart: the sink, which keeps what it read, has it twice (delivery is at-least-once
        // when a stop cuts it, as after a crash).
        router.spawn().await;
        let received = sink.wait_for(2, Duration::from_secs(20)).await;
        assert_eq!(received.len(), 2);
        router
            .log_with(&["to=<b@switchyard.test>", "status=sent"])
            .await;
    }
}
