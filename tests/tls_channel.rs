//! A channel endpoint behind TLS signed by a private CA: trusted only when
//! `channels.<kind>.ca_file` names that CA. The endpoint is a real HTTPS server
//! (Python's `http.server` with `ssl`) on 127.0.0.1, with certificates made
//! for this test by the openssl command.

mod harness;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::{free_port, wait_for};
use nudge::dispatch::{Channel, DispatchError, HttpChannel, Message};
use nudge::model::ChannelKind;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn message() -> Message {
    Message {
        idempotency_key: "i:push".into(),
        customer: "c1".into(),
        journey: "j".into(),
        instance: "i".into(),
        step: "push".into(),
        channel: ChannelKind::Push,
        template: "t".into(),
        variables: Default::default(),
        address: None,
        history: vec![],
        attempt: 1,
    }
}

#[tokio::test]
async fn a_private_ca_is_trusted_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=nudge test CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );

    let port = free_port();
    std::fs::write(
        d.join("server.py"),
        r#"
import http.server, ssl, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("server.pem", "server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#,
    )
    .unwrap();
    let _server = Server(
        Command::new("python3")
            .args(["server.py", &port.to_string()])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(10), "the TLS server to listen", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let url = format!("https://localhost:{port}/push");

    let untrusted = HttpChannel::new(&url, Duration::from_secs(5), None).unwrap();
    let err = untrusted.send(&message()).await.unwrap_err();
    assert!(
        matches!(err, DispatchError::Transport(_)),
        "an unknown CA is refused: {err}"
    );

    let ca = std::fs::read(d.join("ca.pem")).unwrap();
    let trusted = HttpChannel::with_ca(&url, Duration::from_secs(5), None, Some(&ca)).unwrap();
    trusted
        .send(&message())
        .await
        .expect("the configured CA is trusted");

    let garbage = HttpChannel::with_ca(
        &url,
        Duration::from_secs(5),
        None,
        Some(b"not a certificate"),
    );
    assert!(
        garbage.is_err(),
        "a ca_file without certificates is an error at start"
    );
}
