//! Named listeners over real processes (loopback only): every worker serves every listener,
//! each listener reaches workers by the systemd convention, bad listeners fail `init`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// `GET /` on a fresh connection to `addr` (any family): status and body.
fn get_at(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
}

fn ipv6_loopback_works() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn ipv4_and_ipv6_listeners_are_each_served_by_every_worker() {
    let mut list = vec!["--workers", "2", "--listen", "v4=127.0.0.1:0", "--listen", "other=127.0.0.1:0"];
    let v6 = ipv6_loopback_works();
    if v6 {
        list.extend(["--listen", "v6=[::1]:0"]);
    } else {
        eprintln!("no IPv6 loopback here: IPv4 listeners only");
    }
    let tb = Testbed::start(&list);
    let names: Vec<&str> = tb.listeners.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["v4", "other"];
    if v6 {
        expected.push("v6");
    }
    assert_eq!(names, expected, "one line per listener, in order");
    let first: SocketAddr = tb.listeners[0].1.parse().unwrap();
    assert_eq!(tb.ready_line, format!("ready: 2 workers on port {}", first.port()), "the first listener's port");
    for (name, addr) in &tb.listeners {
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{name}: {addr}: {e}"));
        assert_ne!(addr.port(), 0, "{name}: the real port");
        let mut workers = BTreeSet::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let (status, body) = get_at(addr, "/").unwrap();
                assert_eq!(status, 200, "{name}: {body}");
                workers.extend(worker_of(&body));
                workers.len() == 2
            }),
            "{name}: both workers answer ({workers:?})"
        );
        let (_, env) = get_at(addr, "/listen-env").unwrap();
        let names = expected.join(":");
        assert!(
            env.contains(&format!("LISTEN_FDS={} LISTEN_FDNAMES={names} names={names}", expected.len())),
            "{name}: {env}"
        );
    }
}

#[test]
fn listeners_stop_at_once_in_a_graceful_shutdown() {
    let mut tb = Testbed::start(&["--workers", "1", "--listen", "a=127.0.0.1:0", "--listen", "b=127.0.0.1:0"]);
    let addrs: Vec<SocketAddr> = tb.listeners.iter().map(|(_, a)| a.parse().unwrap()).collect();
    // A request in flight (on a, the ready line's port) while SIGTERM arrives finishes; then
    // both refuse.
    assert_eq!(tb.port, addrs[0].port());
    let (_, slow) = tb.get_in_flight("/slow?ms=500");
    tb.signal(Signal::TERM);
    assert_eq!(slow.join().unwrap().unwrap(), (200, "slow 500".to_owned()));
    assert!(tb.wait_exit(Duration::from_secs(10)).expect("exits").success());
    for a in addrs {
        assert!(TcpStream::connect(a).is_err(), "{a} still accepts");
    }
}

#[test]
fn bad_listeners_fail_init_naming_the_listener_and_nothing_is_spawned() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let same = format!("127.0.0.1:{port}");
    for (list, says) in [
        (
            vec!["--listen", "a=127.0.0.1:0", "--listen", "a=127.0.0.1:0"],
            "listener \"a\": two listeners have this name",
        ),
        (vec!["--listen", &format!("a={same}"), "--listen", &format!("b={same}")], "listener \"b\": 127.0.0.1"),
        (vec!["--listen", "a:b=127.0.0.1:0"], "listener \"a:b\""),
    ] {
        let mut opts = args(&list);
        opts.args.extend(["--workers".to_owned(), "2".to_owned()]);
        let (mut tb, rx) = Testbed::spawn(opts);
        let st = tb.wait_exit(Duration::from_secs(10)).expect("init fails and the master exits");
        assert!(!st.success(), "{list:?}");
        let log = tb.stderr();
        assert!(log.contains(says), "{list:?}: {log}");
        assert!(!log.contains("on_start"), "{list:?}: a worker was spawned: {log}");
        assert!(rx.try_recv().is_err(), "{list:?}: nothing on stdout");
    }
}
