//! Traffic shaping: a destination's rule paces what goes to it.

use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::router::{Router, RouterOptions};
use crate::harness::sink::Sink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_of_ten_a_second_holds_within_ten_percent_over_three_hundred_messages() {
    const MESSAGES: usize = 300;
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: "[[shaping]]\ndomain = \"*\"\nrate = \"10/s\"\n".to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    // The backlog builds faster than it may drain, while the sink is watched.
    let port = router.port;
    let sending = tokio::spawn(async move {
        let mut client = TestClient::connect(port).await;
        for n in 0..MESSAGES {
            client
                .send_accepted(
                    "s@sender.test",
                    &["r@elsewhere.test"],
                    &message(&format!("paced {n}")),
                )
                .await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    let mut counts = Vec::new();
    let mut mark = Instant::now();
    while sink.received().len() < MESSAGES {
        let now = Instant::now();
        if now.duration_since(mark) >= Duration::from_secs(1) {
            counts.push(sink.received().len());
            mark = now;
        }
        if first.is_none() && !sink.received().is_empty() {
            first = Some(now);
        }
        assert!(
            now < deadline,
            "{} of {MESSAGES} delivered",
            sink.received().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = first.expect("a first delivery").elapsed();
    sending.await.expect("every message sent");
    let subjects: std::collections::HashSet<String> = sink
        .received()
        .iter()
        .filter_map(|m| {
            m.data
                .lines()
                .find(|l| l.starts_with("Subject:"))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        subjects.len(),
        MESSAGES,
        "each message once: {}",
        router.log().matches("status=sent").count()
    );
    // 299 intervals of 100 ms after the first.
    let expected = Duration::from_millis(100 * (MESSAGES as u64 - 1));
    assert!(
        took >= expected.mul_f64(0.9) && took <= expected.mul_f64(1.1),
        "{MESSAGES} messages at 10/s took {took:?}, expected {expected:?} within 10 %; delivered by each second: {counts:?}"
    );
}
