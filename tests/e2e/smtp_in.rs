//! The SMTP server side: extensions and every kind of bad input, each with its exact reply.

use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::router::{Router, RouterOptions};
use crate::harness::sink::Sink;

/// A router that relays everything to a sink on 127.0.0.1.
async fn router_with_sink(smtp: &str) -> (Router, Sink) {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        smtp: smtp.to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    (router, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_is_queued_stamped_and_delivered() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect_raw(router.port).await;
    assert_eq!(client.reply().await.code, 220);
    let ehlo = client.command("EHLO client.test").await;
    for extension in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(
            ehlo.text.contains(extension),
            "{extension} missing from {}",
            ehlo.text
        );
    }
    client
        .send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@switchyard.test>\r\nRCPT TO:<c@elsewhere.test>\r\nDATA\r\n")
        .await;
    assert_eq!(client.reply().await.text, "250 2.1.0 Ok");
    assert_eq!(client.reply().await.text, "250 2.1.5 Ok");
    assert_eq!(client.reply().await.text, "250 2.1.5 Ok");
    assert_eq!(client.reply().await.code, 354);
    client
        .send(b"Subject: pipelined\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
        .await;
    let queued = client.reply().await;
    assert!(
        queued.text.starts_with("250 2.0.0 Ok: queued as "),
        "{queued:?}"
    );
    let queue_id = queued.text.rsplit(' ').next().expect("id").to_string();
    assert_eq!(client.command("QUIT").await.text, "221 2.0.0 Bye");

    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    let message = &received[0];
    assert_eq!(message.mail_from, "a@sender.test");
    assert_eq!(
        message.rcpt_to,
        vec!["b@switchyard.test", "c@elsewhere.test"]
    );
    assert!(
        message.data.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.switchyard.test (Switchyard)"
        ),
        "{}",
        message.data
    );
    assert!(message.data.contains(&format!("with ESMTP id {queue_id}")));
    assert!(message
        .data
        .contains(&format!("Message-ID: <{queue_id}@mx.switchyard.test>\r\n")));
    assert!(
        message.data.ends_with("\r\n.leading dot\r\nbody\r\n"),
        "dot-stuffing survives the round trip"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_make_one_message() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.code,
        250
    );
    let first = "Subject: chunked\r\n\r\nfirst ";
    client
        .send(format!("BDAT {}\r\n{first}", first.len()).as_bytes())
        .await;
    assert_eq!(
        client.reply().await.text,
        format!("250 2.0.0 {} octets received", first.len())
    );
    let last = "part\r\n";
    client
        .send(format!("BDAT {} LAST\r\n{last}", last.len()).as_bytes())
        .await;
    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("250 2.0.0 Ok: queued as"),
        "{reply:?}"
    );
    // DATA after BDAT in one transaction is refused; BDAT without MAIL is read and refused.
    client.send(b"BDAT 5 LAST\r\nhello").await;
    assert_eq!(
        client.reply().await.text,
        "503 5.5.1 Error: need MAIL command"
    );
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        received[0]
            .data
            .ends_with("Subject: chunked\r\n\r\nfirst part\r\n"),
        "{}",
        received[0].data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_addresses_need_smtputf8_and_arrive_intact() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client.command("MAIL FROM:<jøran@bücher.test>").await.text,
        "553 5.6.7 Non-ASCII sender address needs SMTPUTF8"
    );
    assert_eq!(
        client
            .command("MAIL FROM:<jøran@bücher.test> SMTPUTF8 BODY=8BITMIME")
            .await
            .code,
        250
    );
    assert_eq!(
        client
            .command("RCPT TO:<δοκιμή@switchyard.test>")
            .await
            .code,
        250
    );
    assert_eq!(client.command("DATA").await.code, 354);
    client
        .send("Subject: grüße\r\n\r\n8-bit body: ÆØÅ\r\n.\r\n".as_bytes())
        .await;
    assert_eq!(client.reply().await.code, 250);
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].mail_from, "jøran@bücher.test");
    assert_eq!(received[0].rcpt_to, vec!["δοκιμή@switchyard.test"]);
    assert!(received[0].data.contains("with UTF8SMTP id"));
    assert!(received[0].data.ends_with("8-bit body: ÆØÅ\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_and_bare_cr_in_data_are_refused_and_the_session_closed() {
    let (router, sink) = router_with_sink("").await;
    for content in [
        "Subject: x\r\n\r\nbare\nlf\r\n",
        // The smuggling shape: a fake end of data with bare LFs, then a second message.
        "Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@sender.test>\r\n",
        "Subject: x\r\n\r\nbare\rcr\r\n",
    ] {
        let mut client = TestClient::connect(router.port).await;
        assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
        assert_eq!(
            client.command("RCPT TO:<b@switchyard.test>").await.code,
            250
        );
        assert_eq!(client.command("DATA").await.code, 354);
        client.send(content.as_bytes()).await;
        client.send(b".\r\nNOOP\r\n").await;
        assert_eq!(
            client.reply().await.text,
            "550 5.5.2 Bare LF or CR in message content is not allowed; lines must end with CRLF",
            "content {content:?}"
        );
        // RFC 5321 3.8: 421 before closing; the pipelined NOOP is never read as a command.
        assert_eq!(
            client.reply().await.text,
            "421 4.5.2 mx.switchyard.test closing connection after malformed message content"
        );
        assert!(client.is_closed().await, "content {content:?}");
    }
    // A clean message goes through.
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client
            .send_mail("a@sender.test", &["b@switchyard.test"], &message("clean"))
            .await
            .code,
        250
    );
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.received().len(),
        1,
        "only the clean message was relayed"
    );
    assert!(received[0].data.contains("Subject: clean"));
    // A bare LF ending a command is refused too.
    assert_eq!(
        client
            .command("NOOP\n")
            .await
            .text
            .lines()
            .next()
            .map(str::to_string),
        Some("500 5.5.2 Bare LF in command; lines must end with CRLF".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_data_is_refused_and_the_session_goes_on() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    for content in [
        "Subject: x\r\n\r\nnul\0here\r\n",
        "Subject: \0\r\n\r\nbody\r\n",
    ] {
        let reply = client
            .send_mail("a@sender.test", &["b@switchyard.test"], content)
            .await;
        assert_eq!(
            reply.text, "550 5.6.0 NUL characters in message content are not allowed",
            "{content:?}"
        );
    }
    // BDAT: the same rule.
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.code,
        250
    );
    let content = "Subject: x\r\n\r\nnul\0\r\n";
    client
        .send(format!("BDAT {} LAST\r\n{content}", content.len()).as_bytes())
        .await;
    assert_eq!(client.reply().await.code, 550);
    client
        .send_accepted("a@sender.test", &["b@switchyard.test"], &message("clean"))
        .await;
    sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received().len(), 1);
    assert!(!sink.received()[0].data.contains('\0'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_commands_are_refused() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect_raw(router.port).await;
    assert_eq!(client.reply().await.code, 220);
    for command in [
        "EHLO a\0b",
        "HELO \0",
        "EHLO client\x1b[2J.test",
        "MAIL FROM:<a@sender.test>\0",
        "NOOP \x7f",
    ] {
        let reply = client.command(command).await;
        assert_eq!(
            reply.text, "500 5.5.2 Control characters in commands are not allowed",
            "{command:?}"
        );
    }
    // A tab is whitespace (here a syntax error), not a control character.
    assert_eq!(client.command("HELO a\tb").await.code, 501);
    assert_eq!(client.command("EHLO client.test").await.code, 250);
    client
        .send_accepted("a@sender.test", &["b@switchyard.test"], &message("after"))
        .await;
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        received[0]
            .data
            .starts_with("Received: from client.test ([127.0.0.1])"),
        "only the clean HELO name reaches the Received header: {}",
        received[0].data
    );
    assert!(!received[0].data.contains('\0'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_lines_are_refused() {
    let (router, _sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client
            .command(&format!("NOOP {}", "x".repeat(3000)))
            .await
            .text,
        "500 5.5.2 Command line too long"
    );
    assert_eq!(
        client.command("NOOP").await.code,
        250,
        "in step after the long command"
    );
    let content = format!("Subject: long\r\n\r\n{}\r\n", "y".repeat(999));
    let reply = client
        .send_mail("a@sender.test", &["b@switchyard.test"], &content)
        .await;
    assert_eq!(
        reply.text,
        "550 5.6.0 Message content has a line longer than 998 characters"
    );
    let fits = format!("Subject: long\r\n\r\n{}\r\n", "y".repeat(998));
    assert_eq!(
        client
            .send_mail("a@sender.test", &["b@switchyard.test"], &fits)
            .await
            .code,
        250
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_big_messages_are_refused() {
    let (router, _sink) = router_with_sink("max_message_size = 2000\n").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client
            .command("MAIL FROM:<a@sender.test> SIZE=5000")
            .await
            .text,
        "552 5.3.4 Message size exceeds fixed maximum message size of 2000 bytes"
    );
    let body = "z".repeat(100) + "\r\n";
    let content = format!("Subject: big\r\n\r\n{}", body.repeat(30));
    let reply = client
        .send_mail("a@sender.test", &["b@switchyard.test"], &content)
        .await;
    assert_eq!(
        reply.text,
        "552 5.3.4 Message size exceeds fixed maximum message size of 2000 bytes"
    );
    // BDAT over the limit too.
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.code,
        250
    );
    client
        .send(format!("BDAT {} LAST\r\n{content}", content.len()).as_bytes())
        .await;
    assert_eq!(
        client.reply().await.text,
        "552 5.3.4 Message size exceeds fixed maximum message size of 2000 bytes"
    );
    assert_eq!(client.command("NOOP").await.code, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients() {
    let (router, _sink) = router_with_sink("max_recipients = 2\n").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b1@switchyard.test>").await.code,
        250
    );
    assert_eq!(
        client.command("RCPT TO:<b2@switchyard.test>").await.code,
        250
    );
    assert_eq!(
        client.command("RCPT TO:<b3@switchyard.test>").await.text,
        "452 4.5.3 Too many recipients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_attempt_from_outside_is_refused() {
    let router = Router::start(RouterOptions {
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<victim@elsewhere.test>").await.text,
        "550 5.7.1 <victim@elsewhere.test>: Relay access denied"
    );
    assert_eq!(
        client.command("RCPT TO:<b@SwitchYard.Test>").await.code,
        250,
        "accepted domain, any case"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors() {
    let (router, _sink) = router_with_sink("max_errors = 5\n").await;
    let mut client = TestClient::connect_raw(router.port).await;
    assert_eq!(client.reply().await.code, 220);
    assert_eq!(
        client.command("MAIL FROM:<a@sender.test>").await.text,
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    assert_eq!(client.command("EHLO client.test").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.text,
        "503 5.5.1 Error: need MAIL command"
    );
    assert_eq!(
        client.command("MAIL FROM:a@sender.test").await.text,
        "501 5.5.4 Syntax: address must be enclosed in <>"
    );
    assert_eq!(client.command("VRFY b").await.code, 252);
    assert_eq!(
        client.command("MAIL FROM:<a@sender.test> FOO=1").await.text,
        "555 5.5.4 Unsupported parameter FOO"
    );
    assert_eq!(
        client.command("BOGUS").await.text,
        "500 5.5.2 Command not recognized"
    );
    // The fifth error also ends the session.
    assert_eq!(
        client.reply().await.text,
        "421 4.7.0 Too many errors, closing connection"
    );
    assert!(client.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_talker_is_refused() {
    let router = Router::start(RouterOptions {
        greeting_delay: "700ms",
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect_raw(router.port).await;
    client.send(b"EHLO hasty.test\r\n").await;
    assert_eq!(
        client.reply().await.text,
        "554 5.5.1 Protocol error: client talked before the greeting"
    );
    assert!(client.is_closed().await);
    let mut patient = TestClient::connect_raw(router.port).await;
    assert_eq!(patient.reply().await.code, 220);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_ip_are_limited() {
    let (router, _sink) = router_with_sink("max_sessions_per_ip = 2\n").await;
    // The harness's readiness probe was a connection from 127.0.0.1 too: until the server has
    // seen it close, it holds one of the two places. Wait for it to go, then take both.
    let greeted = |port| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = TestClient::connect_raw(port).await;
            let greeting = client.reply().await;
            if greeting.code == 220 {
                return client;
            }
            assert!(Instant::now() < deadline, "never greeted: {greeting:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _first = greeted(router.port).await;
    let _second = greeted(router.port).await;
    let mut third = TestClient::connect_raw(router.port).await;
    assert_eq!(
        third.reply().await.text,
        "421 4.7.0 Too many connections from 127.0.0.1, try again later"
    );
}

/// Connects from `source` to `target` and reads the first reply line; keeps the connection.
async fn greeting(source: &str, target: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncBufReadExt;
    let source: std::net::IpAddr = source.parse().expect("source");
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket.bind((source, 0).into()).expect("bind the source");
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
        .await
        .expect("connect in time")
        .expect("connect");
    let (read, write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .expect("a reply in time")
        .expect("read");
    let stream = reader.into_inner().reunite(write).expect("one stream");
    (stream, line.trim_end().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_counted_by_network_an_ipv6_one_by_its_64() {
    let router = Router::start_with(|dir, port| {
        format!(
            "hostname = \"mx.switchyard.test\"\ndata_dir = \"{}\"\n\n\
             [[listener]]\nname = \"v4\"\naddress = \"127.0.0.1:{port}\"\ngreeting_delay = \"0s\"\n\n\
             [[listener]]\nname = \"v6\"\naddress = \"[::1]:{port}\"\ngreeting_delay = \"0s\"\n\n\
             [smtp]\nmax_sessions_per_ip = 2\nclient_prefix_v4 = 24\n\n\
             [authentication]\nverify = false\n",
            dir.display()
        )
    })
    .await;
    // The harness's readiness probe was a session too: let it end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v6: std::net::SocketAddr = format!("[::1]:{}", router.port).parse().expect("addr");
    let (_first, reply) = greeting("::1", v6).await;
    assert!(reply.starts_with("220 "), "{reply}");
    let (_second, reply) = greeting("::1", v6).await;
    assert!(reply.starts_with("220 "), "{reply}");
    let (_third, reply) = greeting("::1", v6).await;
    assert_eq!(
        reply,
        "421 4.7.0 Too many connections from ::/64, try again later"
    );

    // IPv4 by the configured /24: three loopback addresses, one count.
    let v4: std::net::SocketAddr = format!("127.0.0.1:{}", router.port).parse().expect("addr");
    let (_a, reply) = greeting("127.0.0.2", v4).await;
    assert!(reply.starts_with("220 "), "{reply}");
    let (_b, reply) = greeting("127.0.0.3", v4).await;
    assert!(reply.starts_with("220 "), "{reply}");
    let (_c, reply) = greeting("127.0.0.4", v4).await;
    assert_eq!(
        reply,
        "421 4.7.0 Too many connections from 127.0.0.0/24, try again later"
    );
    // Another /24 is not counted with them.
    let (_d, reply) = greeting("127.0.1.1", v4).await;
    assert!(reply.starts_with("220 "), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_never_echo_a_clients_non_ascii_bytes() {
    let (router, _sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client.command("MAIL FROM:<a@sender.test> Föö=1").await;
    assert_eq!(reply.text, "501 5.5.4 Bad parameter syntax: F??=1");
    let reply = client.command("MAIL FROM:<a@sender.test> X=1 Ünï=2").await;
    assert!(reply.text.is_ascii(), "{reply:?}");
    assert_eq!(reply.code, 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_timed_out() {
    let (router, _sink) = router_with_sink("command_timeout = \"1s\"\n").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client.reply().await.text,
        "421 4.4.2 Timeout exceeded, closing connection"
    );
    assert!(client.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_its_replies_is_dropped() {
    // Pipelined NOOPs without reading a reply: the server's replies fill the socket buffers, its
    // writes block, and the write timeout (command_timeout) must end the session rather than let
    // it hold its slot forever. Until then the client's own writes block too.
    let (router, _sink) = router_with_sink("command_timeout = \"1s\"\n").await;
    let mut client = TestClient::connect(router.port).await;
    let burst = b"NOOP\r\n".repeat(10_000);
    let flood = async {
        loop {
            if let Err(error) = client.try_send(&burst).await {
                return error;
            }
        }
    };
    let error = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the server dropped a client that never reads");
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_rset_and_vrfy_answer_as_documented() {
    let (router, sink) = router_with_sink("").await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client.command("HELP").await.text,
        "214 2.0.0 Commands: EHLO HELO AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS"
    );
    assert_eq!(
        client.command("VRFY postmaster").await.text,
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    );
    assert_eq!(client.command("NOOP").await.text, "250 2.0.0 Ok");
    // RSET forgets the transaction under way: the recipient given before it gets nothing.
    assert_eq!(client.command("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client
            .command("RCPT TO:<dropped@switchyard.test>")
            .await
            .code,
        250
    );
    assert_eq!(client.command("RSET").await.text, "250 2.0.0 Ok");
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.text,
        "503 5.5.1 Error: need MAIL command"
    );
    client
        .send_accepted(
            "a@sender.test",
            &["kept@switchyard.test"],
            &message("after rset"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        received[0].rcpt_to,
        vec!["kept@switchyard.test".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_its_memory_limit_the_server_refuses_new_sessions_with_421() {
    // A limit below what any process holds. The memory is not the sessions' (none is open),
    // so one is admitted; while it is open, every new one is refused, politely, and the
    // server says why in its log.
    let router = Router::start(RouterOptions {
        smtp: "memory_limit = \"1MiB\"\n".to_string(),
        ..RouterOptions::default()
    })
    .await;
    // (The harness's own check that the server is up may still hold the one place: wait.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = loop {
        let mut client = TestClient::connect_raw(router.port).await;
        if client.reply().await.code == 220 {
            break client;
        }
        assert!(Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..3 {
        let mut client = TestClient::connect_raw(router.port).await;
        assert_eq!(
            client.reply().await.text,
            "421 4.3.2 Too busy (memory is short), try again later"
        );
    }
    router
        .log_with(&["resident memory above [smtp] memory_limit"])
        .await;
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = TestClient::connect_raw(router.port).await;
        if client.reply().await.code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's resident memory, from `/proc`.
fn resident_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line[6..]
        .split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Restarts `router` with `[smtp] memory_limit` at its idle resident memory and `headroom`
/// more; returns the limit.
async fn restart_with_memory_limit(router: &mut Router, headroom: u64) -> u64 {
    let idle = resident_of(router.pid());
    router.terminate();
    router.wait_exit(Duration::from_secs(10)).await;
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    let limit = idle + headroom;
    let config = config.replacen(
        "[smtp]\n",
        &format!(
            "[smtp]\nmemory_limit = \"{limit}\"\nmax_sessions = 5000\nmax_sessions_per_ip = 5000\n"
        ),
        1,
    );
    std::fs::write(&router.config_path, config).expect("config");
    router.spawn().await;
    limit
}

/// Opens sessions, each inside DATA with 256 KiB of a message sent, until a new one is refused
/// at connect; returns the sessions held and the refusal.
async fn flood_until_refused(router: &Router) -> (Vec<TestClient>, crate::harness::client::Reply) {
    let chunk = format!("{}\r\n", "x".repeat(998)).repeat(256);
    let mut held = Vec::new();
    loop {
        assert!(
            held.len() < 2000,
            "never refused; resident {}",
            resident_of(router.pid())
        );
        let mut client = TestClient::connect_raw(router.port).await;
        let greeting = client.reply().await;
        match greeting.code {
            421 => return (held, greeting),
            220 => {}
            // Greeted just as the limit was passed: a plugin's connect hook was held back.
            _ => continue,
        }
        client.command("EHLO flood.test").await;
        client.command("MAIL FROM:<s@sender.test>").await;
        client.command("RCPT TO:<r@switchyard.test>").await;
        assert_eq!(client.command("DATA").await.code, 354);
        client.send(b"Subject: held\r\n\r\n").await;
        client.send(chunk.as_bytes()).await;
        held.push(client);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sessions_holding_data_meets_421_at_the_memory_limit_and_admission_returns() {
    // The limit: what the server holds when idle, and 48 MiB more.
    let mut router = Router::start(RouterOptions::default()).await;
    let limit = restart_with_memory_limit(&mut router, 48 << 20).await;
    let (mut held, refused) = flood_until_refused(&router).await;
    assert_eq!(
        refused.text,
        "421 4.3.2 Too busy (memory is short), try again later"
    );
    eprintln!(
        "refused after {} sessions at {} bytes resident (limit {limit})",
        held.len(),
        resident_of(router.pid())
    );
    assert!(
        held.len() >= 20,
        "refused too early: {} sessions",
        held.len()
    );
    // The sessions under way are still served.
    let mut first = held.remove(0);
    first.send(b".\r\n").await;
    assert_eq!(first.reply().await.code, 250);
    // When they are gone and the memory with them, new sessions are greeted again.
    drop(first);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = TestClient::connect_raw(router.port).await;
        if client.reply().await.code == 220 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused at {} bytes resident (limit {limit})",
            resident_of(router.pid())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    router
        .log_with(&["resident memory back below [smtp] memory_limit"])
        .await;
}

/// A router with the noop plugin on every hook and `[smtp] memory_limit` 48 MiB above its
/// idle memory.
async fn noop_chain_with_memory_limit() -> Router {
    let chain = format!(
        "[[plugin]]\nname = \"noop\"\npath = \"{}\"\n",
        crate::harness::router::plugin_path("noop").display()
    );
    let mut router = Router::start(RouterOptions {
        extra: chain,
        ..RouterOptions::default()
    })
    .await;
    restart_with_memory_limit(&mut router, 48 << 20).await;
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flood_through_plugins_sessions_are_admitted_though_the_pool_keeps_memory() {
    // The plugin pool keeps its warm slots resident after the flood: the memory does not come
    // back under the limit, and admission must come back all the same.
    let router = noop_chain_with_memory_limit().await;
    let (held, refused) = flood_until_refused(&router).await;
    assert_eq!(refused.code, 421, "{refused:?}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = TestClient::connect_raw(router.port).await;
        if client.reply().await.code == 220 {
            client.command("EHLO client.test").await;
            client
                .send_accepted("s@sender.test", &["r@switchyard.test"], &message("after"))
                .await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused at {} bytes resident",
            resident_of(router.pid())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_memory_pressure_a_new_plugin_run_waits_then_is_deferred_or_starts_when_admission_returns(
) {
    let router = noop_chain_with_memory_limit().await;
    // A session admitted before the flood, its first transaction done: its next transaction
    // needs a new plugin run.
    let mut early = TestClient::connect(router.port).await;
    early
        .send_accepted("s@sender.test", &["r@switchyard.test"], &message("before"))
        .await;
    let (held, refused) = flood_until_refused(&router).await;
    assert_eq!(refused.code, 421, "{refused:?}");
    // While new sessions are refused, the new run waits, then the transaction is deferred.
    let started = Instant::now();
    let reply = early.command("MAIL FROM:<s@sender.test>").await;
    let waited = started.elapsed();
    assert_eq!(
        reply.text,
        "451 4.3.2 Too busy (memory is short), try again later"
    );
    assert!(
        (Duration::from_millis(4500)..Duration::from_secs(15)).contains(&waited),
        "deferred after {waited:?}"
    );
    // It waits again; the flood's sessions go and a new client is admitted (by the sessions'
    // count: the plugin pool keeps its memory): the waiting run starts.
    let waiting = tokio::spawn(async move {
        let reply = early.command("MAIL FROM:<s@sender.test>").await;
        (early, reply)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let mut client = TestClient::connect_raw(router.port).await;
        if client.reply().await.code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "admission did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut early, mut reply) = waiting.await.expect("the waiting session");
    if reply.code == 451 {
        // On a slow machine the flood's end may outlast the wait: admission is back now, so
        // the next transaction's run starts at once.
        eprintln!("the wait ended before admission came back: {reply:?}");
        reply = early.command("MAIL FROM:<s@sender.test>").await;
    }
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(early.command("RCPT TO:<r@switchyard.test>").await.code, 250);
    assert_eq!(early.command("DATA").await.code, 354);
    early.send(message("after").as_bytes()).await;
    early.send(b".\r\n").await;
    assert_eq!(early.reply().await.code, 250);
    router
        .log_with(&[
            "memory is short: a new plugin run waits",
            "memory is still short: the transaction is deferred",
        ])
        .await;
}
