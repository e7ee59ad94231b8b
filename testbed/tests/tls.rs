//! The HTTPS example (`examples/https.rs`): TLS with rustls on one named listener, an HTTP
//! redirect on another, checked with a real TLS client over loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files in `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// One plain HTTP request; the response as text.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(sock, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    sock.read_to_string(&mut response)?;
    Ok(response)
}

#[test]
fn https_with_rustls_and_an_http_redirect_on_a_second_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificate(dir.path());
    let opts = Options {
        program: Some(example_binary("https")),
        args: ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]
            .into_iter()
            .chain(["--https-port", "0", "--http-port", "0", "--workers", "2"])
            .map(str::to_owned)
            .collect(),
        exact_args: true,
        ..Options::default()
    };
    let (mut tb, rx) = Testbed::spawn(opts);
    // The example prints where each listener is, then the master logs when every worker is ready.
    let mut ports = std::collections::HashMap::new();
    while ports.len() < 2 {
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no listeners\n{}", tb.stderr()));
        if let Some((name, addr)) = line.strip_prefix("listener ").and_then(|rest| rest.split_once(' ')) {
            let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
            ports.insert(name.to_owned(), port);
        }
    }
    let (https, http) = (ports["https"], ports["http"]);
    assert!(tb.wait_log(Duration::from_secs(30), |l| l.contains("listening on")), "{}", tb.stderr());
    tb.remember_workers();
    // Every worker answers over TLS, to a client that trusts only our certificate.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let response = https_get(https, &ca, "/").unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let id = response.split("Hello over TLS from worker ").nth(1).and_then(|r| r.split('!').next());
        seen.insert(id.expect("the greeting").to_owned());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both workers serve TLS: {seen:?}");
    // A client that does not trust the certificate is refused by its own TLS stack.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    assert!(https_get(https, other.cert.der(), "/").is_err(), "an untrusted certificate is not accepted");
    // Plain HTTP on the second listener redirects to the same path over HTTPS.
    let response = http_get(http, "/some/path?x=1").unwrap();
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    let location = format!("location: https://127.0.0.1:{https}/some/path?x=1");
    assert!(response.to_ascii_lowercase().contains(&location), "{response}");
    // TLS spoken to the HTTP port, or HTTP to the TLS port, does not disturb the cluster.
    assert!(https_get(http, &ca, "/").is_err());
    let _ = http_get(https, "/");
    assert!(https_get(https, &ca, "/").unwrap().starts_with("HTTP/1.1 200"));
    tb.signal(Signal::TERM);
    let status = tb.wait_exit(Duration::from_secs(20)).expect("the master stops");
    assert!(status.success(), "{status:?}\n{}", tb.stderr());
}

/// A certificate file that is not one stops the start with one sentence naming the file.
#[test]
fn a_bad_certificate_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cert.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let mut cmd = std::process::Command::new(example_binary("https"));
    cmd.args([
        "--cert",
        bad.to_str().unwrap(),
        "--key",
        bad.to_str().unwrap(),
        "--https-port",
        "0",
        "--http-port",
        "0",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(20)).expect("it gives up at once");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("https: ") && last.contains(bad.to_str().unwrap()), "{err}");
}
