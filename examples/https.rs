//! HTTPS with rustls on one listener, and plain HTTP on a second one that redirects to it: two
//! named listeners of one cluster, each worker serving both.
//!
//! ```sh
//! # a certificate and key in PEM (for a try: a self-signed pair from openssl or mkcert)
//! cargo run --release --example https -- --cert cert.pem --key key.pem --https-port 8443 --http-port 8080
//! curl -k https://127.0.0.1:8443/      # Hello over TLS from worker N!
//! curl -i http://127.0.0.1:8080/x      # 308 Permanent Redirect, Location: https://127.0.0.1:8443/x
//! ```
//!
//! The master binds both ports; each worker takes its two listeners by name, terminates TLS with
//! tokio-rustls, serves HTTP/1.1 and HTTP/2 (ALPN) with hyper, and drains both on SIGTERM.
//!
//! With `--systemd` the master binds nothing: both listeners are the sockets systemd passes
//! under their names (`FileDescriptorName=https` and `FileDescriptorName=http`), as the units in
//! `deploy/systemd/` pass them (systemd binds ports 443 and 80, so the service needs no
//! privilege):
//!
//! ```sh
//! systemd-socket-activate -l 8443 -l 8080 --fdname=https:http \
//!     target/release/examples/https --systemd --cert cert.pem --key key.pem
//! ```

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use ecewo_cluster::{self as cluster, Cluster, Listen, Listener, Role, Worker};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HOST, LOCATION};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Parser)]
#[command(about = "HTTPS (rustls) and an HTTP redirect, clustered")]
struct Args {
    /// The certificate chain, PEM.
    #[arg(long)]
    cert: PathBuf,
    /// The private key, PEM.
    #[arg(long)]
    key: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
    /// The HTTPS port.
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
    /// The HTTP port, which redirects to HTTPS.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Serve the sockets systemd passes (socket activation) named `https` and `http` instead
    /// of binding `--address`, `--https-port` and `--http-port`.
    #[arg(long, conflicts_with_all = ["address", "https_port", "http_port"])]
    systemd: bool,
    /// Number of workers (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

/// Reads the certificate chain and key; the error is one sentence naming the file.
fn tls_config(args: &Args) -> Result<rustls::ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cannot read the certificates in {}: {e}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .map_err(|e| format!("cannot read the private key in {}: {e}", args.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("the certificate and key do not make a TLS configuration: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!("Hello over TLS from worker {}!", cluster::worker_id());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// `308` to the same path on the HTTPS port of the host the client asked for.
fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = Response::new(Full::new(Bytes::from_static(b"use https\n")));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = format!("https://{host}:{https_port}{path}").parse() {
        resp.headers_mut().insert(LOCATION, location);
    }
    resp
}

/// A listener by name, as a tokio TCP listener.
fn tcp_listener(worker: &Worker, name: &str) -> Result<tokio::net::TcpListener, cluster::Error> {
    let io = |context| move |source| cluster::Error::Io { context, source };
    match worker.take_listener(name)? {
        Listener::Tcp(l) => {
            l.set_nonblocking(true).map_err(io("cannot make a listener non-blocking"))?;
            tokio::net::TcpListener::from_std(l).map_err(io("cannot register a listener with tokio"))
        }
        _ => Err(cluster::Error::Io {
            context: "the https and http listeners must be TCP",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }),
    }
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long connections accepted just before a stop get to send their first request.
const IDLE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The accepted connection, or, when accepting failed (EMFILE and friends under load), nothing
/// after a short pause: the loop goes on accepting instead of spinning or giving up.
async fn accepted_or_back_off(
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<tokio::net::TcpStream> {
    match accepted {
        Ok((stream, _)) => Some(stream),
        Err(e) => {
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            None
        }
    }
}

async fn worker_main(w: &Worker, acceptor: tokio_rustls::TlsAcceptor) -> Result<(), cluster::Error> {
    let https = tcp_listener(w, "https")?;
    let http = tcp_listener(w, "http")?;
    // The real port (the master may have bound port 0), for the redirects.
    let https_port = https.local_addr().map(|a| a.port()).unwrap_or_default();
    // Registered before the worker reports ready, so an early SIGTERM is not lost.
    let shutdown = cluster::serve::shutdown_signal(w)
        .map_err(|e| cluster::Error::Io { context: "cannot install the SIGTERM handler", source: e })?;
    tokio::pin!(shutdown);
    w.ready()?;
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = https.accept() => {
                let Some(stream) = accepted_or_back_off(accepted).await else { continue };
                let (acceptor, builder) = (acceptor.clone(), builder.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    // A client that fails or stalls the handshake only loses its own connection.
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let Ok(Ok(tls)) = handshake.await else { return };
                    let conn = builder.serve_connection(TokioIo::new(tls), service_fn(hello)).into_owned();
                    let _ = watcher.watch(conn).await;
                });
            }
            accepted = http.accept() => {
                let Some(stream) = accepted_or_back_off(accepted).await else { continue };
                let service = service_fn(move |req| async move { Ok::<_, Infallible>(redirect(&req, https_port)) });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        }
    }
    drop((https, http));
    // A connection accepted just before the stop may not have sent its first request yet:
    // closing it now (hyper closes idle connections at once) would reset a request on its way.
    // Give such connections a moment, as `serve`'s idle grace does.
    tokio::time::sleep(IDLE_GRACE.min(w.shutdown_timeout() / 2)).await;
    // hyper's graceful shutdown waits for ever: bound it, the master's SIGKILL is the last word.
    let _ = tokio::time::timeout(w.shutdown_timeout(), graceful.shutdown()).await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).init();
    // Checked in the master too, so that a bad certificate stops the start before any worker.
    let config = match tls_config(&args) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            eprintln!("https: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listen = |port| if args.systemd { Listen::systemd() } else { Listen::tcp(SocketAddr::new(args.address, port)) };
    let result = Cluster::new(0)
        .no_default_listener()
        .listen("https", listen(args.https_port))
        .listen("http", listen(args.http_port))
        .cpus(args.workers)
        .respawn(true)
        .init()
        .and_then(|role| match role {
            Role::Master(master) => {
                // Where each listener is (the real ports, also for port 0), on stdout.
                for listener in master.listeners() {
                    println!("listener {} {}", listener.name, listener.addr);
                }
                master.wait()
            }
            Role::Worker(worker) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                cluster::serve::run_worker(&worker, |w| worker_main(w, acceptor))
            }
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("https: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
