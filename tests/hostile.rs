//! Hostile clients are bounded (issue 16): a body that never comes, a source holding too many
//! connections, a flood of wrong keys. Judged over raw sockets and real HTTP on loopback, with the
//! engine's open file descriptors read from /proc and its Prometheus counters.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn host(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Open file descriptors of this process (the engine runs in it, beside the test's clients).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// 300 connections that declare a 1,000-byte body and never send it are each answered `408`
/// (problem `request-timeout`) and closed within the body timeout; a normal client is served
/// all the while; once the clients let go, the process's file descriptors are back to baseline.
#[actix_rt::test]
async fn slow_bodies_are_answered_408_and_closed_while_others_are_served() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.http.body_timeout = Duration::from_secs(2);
    let server = TestServer::start(config).await;
    let csr = csr(Key::P256, &["served.example.test"]);
    let body = serde_json::json!({ "profile": "tls-server-p256", "csr": csr });
    // A normal client, on connections of its own that close with it.
    let serve_for = |length: Duration| {
        let (url, body) = (server.url("/v1/certificates"), body.clone());
        async move {
            let client = reqwest::Client::new();
            let (started, mut served) = (Instant::now(), 0);
            while started.elapsed() < length {
                let request = client.post(&url).bearer_auth(DEMO_KEY).json(&body);
                assert_eq!(request.send().await.unwrap().status(), 201);
                served += 1;
            }
            served
        }
    };
    // The baseline after the same normal load alone (the pools open their connections lazily).
    serve_for(Duration::from_millis(1500)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = open_fds();
    let host = host(&server);
    let head = format!(
        "POST /v1/certificates HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {DEMO_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    // While they wait and are cut off, a client with a body is served.
    let reads = futures_util::future::join_all(slow.iter_mut().map(|stream| async move {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(6), stream.read_to_end(&mut answer)).await;
        (read.is_ok(), String::from_utf8_lossy(&answer).to_string())
    }));
    let (answers, served) = tokio::join!(reads, serve_for(Duration::from_millis(2500)));
    let closed_after = opened.elapsed();
    assert!(served > 0);
    for (closed, answer) in &answers {
        assert!(closed, "a slow connection was still open 6 s after the body timeout: {answer:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("urn:castellum:problem:request-timeout"), "{answer}");
    }
    // Opening them, the timeout (2 s), then up to actix's client_disconnect_timeout (1 s) for the close; the
    // normal client's 2.5 s of requests run alongside.
    let last_close = answers.len();
    assert!(closed_after < Duration::from_millis(4500), "{last_close} closed only after {closed_after:?}");
    eprintln!(
        "{} slow connections answered 408 and closed within {closed_after:?}; {served} issued meanwhile",
        answers.len()
    );
    drop(slow);
    let started = Instant::now();
    loop {
        let now = open_fds();
        if now <= baseline + 5 {
            break;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let open: Vec<_> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect();
            panic!("{now} open files, {baseline} before the slow clients: {open:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// A source holding more connections than `connections_per_source` is refused on the extra ones
/// (`429`, `Retry-After`, the connection closed); once it lets some go, it is served again.
#[actix_rt::test]
async fn a_source_over_its_connections_is_refused_and_recovers() {
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.http.connections_per_source = 20;
    let server = TestServer::start(config).await;
    let host = host(&server);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(&host).await.unwrap());
    }
    // The engine counts a connection once a worker takes it up (just after the handshake).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ask = |host: String| async move {
        let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.is_ok();
        (closed, String::from_utf8_lossy(&answer).to_string(), stream)
    };
    let (closed, answer, _) = ask(host.clone()).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after:"), "{answer}");
    assert!(answer.contains("too-many-connections"), "{answer}");
    assert!(closed, "the refused connection is closed");
    held.truncate(10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(answer.status(), 200, "served again once the source holds fewer connections");
    assert!(metric(&server, "castellum_source_refusals_total", "listener=\"api\",reason=\"connections\"").await >= 1.0);
    drop(held);
    server.stop().await;
}

/// A flood of wrong API keys from one address is answered `429` with `Retry-After` once past its
/// burst (and counted), while a valid client at the same address keeps 100% success and its p99
/// within 2× of a control phase without the flood. Wrong admin tokens are throttled the same way,
/// and the right one still works.
#[actix_rt::test]
async fn a_wrong_key_flood_gets_429_and_does_not_slow_a_valid_client() {
    let db = TestDb::sqlite();
    let server = std::sync::Arc::new(TestServer::start(dev_config(&db)).await);
    let csr = csr(Key::P256, &["valid.example.test"]);
    let valid = |server: std::sync::Arc<TestServer>, csr: String, length: Duration| async move {
        let mut latencies = Vec::new();
        let started = Instant::now();
        while started.elapsed() < length {
            let sent = Instant::now();
            let status = server.issue(DEMO_KEY, "tls-server-p256", &csr).send().await.unwrap().status();
            assert_eq!(status, 201);
            latencies.push(sent.elapsed());
        }
        latencies.sort();
        latencies[latencies.len() * 99 / 100]
    };
    let control = valid(server.clone(), csr.clone(), Duration::from_secs(2)).await;
    let flood = {
        let server = server.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (mut refused, mut throttled, mut with_retry_after) = (0, 0, 0);
            // ~4,000 wrong keys a second (the trial's flood was 2,000 in 0.25 s): unpaced, this
            // client took ~40,000/s and most of a core of the two the engine is measured on, so
            // the valid client's p99 measured the load generator as much as the engine.
            let mut pace = tokio::time::interval(Duration::from_millis(2));
            while started.elapsed() < Duration::from_millis(2500) {
                pace.tick().await;
                let answers = futures_util::future::join_all(
                    (0..8).map(|_| server.http.get(server.url("/v1/cas")).bearer_auth("wrong-key").send()),
                )
                .await;
                for answer in answers.into_iter().map(Result::unwrap) {
                    match answer.status().as_u16() {
                        401 => refused += 1,
                        429 => {
                            throttled += 1;
                            with_retry_after += usize::from(answer.headers().contains_key("retry-after"));
                        }
                        other => panic!("a wrong key answered {other}"),
                    }
                }
            }
            (refused, throttled, with_retry_after)
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    let during = valid(server.clone(), csr.clone(), Duration::from_secs(2)).await;
    let (refused, throttled, with_retry_after) = flood.await.unwrap();
    eprintln!("wrong keys: {refused} answered 401, {throttled} 429; valid client p99 {control:?} alone, {during:?} beside the flood");
    assert!(refused <= 40 && throttled > 100, "401 only for the burst, then 429: {refused} / {throttled}");
    assert_eq!(with_retry_after, throttled, "every 429 says when to retry");
    assert!(during <= control * 2, "the valid client's p99: {during:?} beside the flood, {control:?} alone");
    let failures = metric(&server, "castellum_auth_failures_total", "listener=\"api\"").await;
    assert_eq!(failures as usize, refused + throttled);

    // The admin listener: wrong tokens throttled after their burst, the right token served.
    let mut admin_statuses = Vec::new();
    for _ in 0..40 {
        let answer = server
            .http
            .get(format!("{}/admin/v1/status", server.admin_base))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        admin_statuses.push(answer.status().as_u16());
    }
    assert!(admin_statuses.contains(&429), "{admin_statuses:?}");
    assert_eq!(admin_status(&server).await["cells"].as_array().map(Vec::len), Some(4), "the right token works");
    std::sync::Arc::try_unwrap(server).ok().expect("no other owner").stop().await;
}
