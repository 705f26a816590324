//! Security against real nats-servers: each authentication method of the settings (token,
//! nkey, creds file with operator/account/user JWTs; user/password is in `nats_setup`), TLS
//! with a private CA and mutual TLS, the least-privilege permission blocks of
//! `docs/permissions.md` for the producer and consumer roles, and secrets kept out of logs,
//! errors and serialized settings.
//!
//! Talks to nats-server processes started from configs by `deltasync-testkit`, through
//! `deltasync_nats`, the producer's and the consumer's real code, and
//! plain async-nats calls. Every credential (nkeys, JWTs, CA, certificates, private keys, passwords)
//! is generated at test time into a temporary directory; nothing secret is committed.

use crate::support::{eventually, settings, unique_pipeline};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::ConnectErrorKind;
use deltasync_config::settings::{EnvVars, Secret, Settings, Sources};
use deltasync_core::codec::encode_envelope;
use deltasync_core::envelope::split_transaction;
use deltasync_core::recovery;
use deltasync_core::recovery::Classified;
use deltasync_core::snapshot::Manifest;
use deltasync_core::{names, Change, Lineage, State};
use deltasync_nats::history::{self, Tail};
use deltasync_nats::store;
use deltasync_nats::NatsError;
use deltasync_testkit::NatsServer;
use futures::StreamExt;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;

/// The permissions document; the test runs its blocks exactly as written.
const PERMISSIONS_DOC: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/permissions.md"
));

/// How long the tests wait for a request that a permission violation swallowed (the server
/// answers a denied publish with an asynchronous `-ERR`, never with a reply).
const DENIED_WAIT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Credentials generated at test time
// ---------------------------------------------------------------------------------------------

/// A random secret: 24 random bytes in hex, unique to this run.
fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).unwrap();
    hex::encode(bytes)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A private CA, a server certificate for `localhost`/`127.0.0.1` and a client certificate,
/// all PEM files in a temporary directory.
struct TlsFiles {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn tls_files() -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "deltasync test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &*ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key_pem) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "deltasync test server",
    );
    let (client_pem, client_key_pem) = leaf(
        vec!["deltasync-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "deltasync test client",
    );
    TlsFiles {
        ca: write(dir.path(), "ca.pem", &ca.pem()),
        server_cert: write(dir.path(), "server.pem", &server_pem),
        server_key: write(dir.path(), "server-key.pem", &server_key_pem),
        client_cert: write(dir.path(), "client.pem", &client_pem),
        client_key: write(dir.path(), "client-key.pem", &client_key_pem),
        _dir: dir,
    }
}

/// Decentralized authentication: an operator, an account with JetStream, and a user of that
/// account with its `.creds` file.
struct Operator {
    _dir: TempDir,
    operator_jwt: String,
    system_public: String,
    system_jwt: String,
    account_public: String,
    account_jwt: String,
    creds: PathBuf,
    user_seed: String,
}

fn operator_setup() -> Operator {
    use nats_jwt_rs::account::{Account, JetStreamLimits, OperatorLimits};
    use nats_jwt_rs::operator::Operator as OperatorClaims;
    use nats_jwt_rs::user::User;
    use nkeys::KeyPair;

    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let mut operator_claims =
        OperatorClaims::new_claims("deltasync-test".into(), operator.public_key());
    operator_claims.payload_mut().system_account = Some(system.public_key());
    let operator_jwt = operator_claims.encode(&operator).unwrap();
    let system_jwt = Account::new_claims("SYS".into(), system.public_key())
        .encode(&operator)
        .unwrap();

    let account = KeyPair::new_account();
    let mut account_claims = Account::new_claims("app".into(), account.public_key());
    account_claims.payload_mut().limits = Some(OperatorLimits {
        jetstream: Some(JetStreamLimits {
            memory_storage: Some(-1),
            disk_storage: Some(-1),
            streams: Some(-1),
            consumer: Some(-1),
            ..Default::default()
        }),
        ..Default::default()
    });
    let account_jwt = account_claims.encode(&operator).unwrap();

    let user = KeyPair::new_user();
    let user_jwt = User::new_claims("producer".into(), user.public_key())
        .encode(&account)
        .unwrap();
    let user_seed = user.seed().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let creds = write(dir.path(), "user.creds", &creds_file(&user_jwt, &user_seed));
    Operator {
        _dir: dir,
        operator_jwt,
        system_public: system.public_key(),
        system_jwt,
        account_public: account.public_key(),
        account_jwt,
        creds,
        user_seed,
    }
}

/// The `.creds` format `nsc` writes.
fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------------------------

/// Everything `tracing` logs on this thread (all targets, TRACE and up) while the guard lives.
/// `#[tokio::test]` runs the test and the tasks it spawns (async-nats's connection handler
/// included) on one thread, so this sees all of them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn connect(s: &Settings) -> jetstream::Context {
    let client = deltasync_nats::connect(&s.nats).await.unwrap();
    deltasync_nats::jetstream(client, &s.nats)
}

/// `err` is a failed connect whose async-nats kind is `kind`.
fn assert_connect_error(err: &NatsError, kind: ConnectErrorKind) {
    let NatsError::Connect { source, .. } = err else {
        panic!("expected a connect error, got {err:?}");
    };
    assert_eq!(source.kind(), kind, "{err}");
}

fn assert_hidden(secret: &str, text: &str, what: &str) {
    assert!(
        !text.contains(secret),
        "{what} shows the secret {secret:?}:\n{text}"
    );
}

fn server_log(server: &NatsServer) -> String {
    std::fs::read_to_string(server.log_path()).unwrap_or_default()
}

/// The server's log lines reporting permission violations.
fn violations(server: &NatsServer) -> Vec<String> {
    server_log(server)
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// Waits until the server logged a violation on `subject` (its log is written by a separate
/// thread), and returns that line.
async fn violation_on(server: &NatsServer, subject: &str) -> String {
    let quoted = format!("\"{subject}\"");
    eventually(
        &format!("the server logs a violation on {subject}"),
        Duration::from_secs(5),
        || async {
            violations(server)
                .into_iter()
                .find(|l| l.contains(&quoted))
                .ok_or("not logged yet")
        },
    )
    .await
}

/// Flushes the server log up to now: publishes (as a restricted role, `js`) to a subject no
/// role may use and waits for its violation, so every line the server logged before is in the
/// log file. Returns the other violations.
async fn flush_server_log(server: &NatsServer, js: &jetstream::Context) -> Vec<String> {
    let sentinel = format!("deltasync-test.sentinel.{}", random_secret());
    js.client()
        .publish(sentinel.clone(), "x".into())
        .await
        .unwrap();
    js.client().flush().await.unwrap();
    violation_on(server, &sentinel).await;
    violations(server)
        .into_iter()
        .filter(|l| !l.contains(&sentinel))
        .collect()
}

/// The blocks of `docs/permissions.md` for `pipeline`: the fenced block after the marker
/// comment, `<pipeline>` replaced.
fn permission_blocks(pipeline: &str) -> String {
    let marker = "<!-- The test extracts the fenced block right below this line";
    let at = PERMISSIONS_DOC
        .find(marker)
        .expect("docs/permissions.md keeps its marker comment");
    let rest = &PERMISSIONS_DOC[at..];
    let open = rest.find("```text\n").expect("a ```text block follows") + "```text\n".len();
    let body = &rest[open..];
    let close = body.find("\n```").expect("the block is closed");
    body[..close].replace("<pipeline>", pipeline)
}

/// The per-role inbox prefixes of `docs/permissions.md` ("Pipelines sharing an account").
fn inbox_prefix(pipeline: &str, role: &str) -> String {
    format!("_INBOX_{pipeline}_{role}")
}

/// A server whose users are a producer and a consumer with the documented permissions for one
/// pipeline (and an unrestricted admin for the tests' own interventions), and settings for
/// each.
struct Secured {
    server: NatsServer,
    producer: Settings,
    consumer: Settings,
    admin: Settings,
}

impl Secured {
    /// The blocks as documented: replies on `_INBOX.>`.
    fn start(prefix: &str) -> Secured {
        Secured::start_with(prefix, false)
    }

    /// With `own_inboxes`, the documented variant for pipelines sharing an account: each role
    /// may subscribe only to its own inbox prefix, and its settings set `nats.inbox_prefix`.
    fn start_with(prefix: &str, own_inboxes: bool) -> Secured {
        let pipeline = unique_pipeline(prefix);
        let mut blocks = permission_blocks(&pipeline);
        if own_inboxes {
            for (role, name) in [
                ("producer", "PRODUCER"),
                ("consumer", "CONSUMER"),
                ("writer", "WRITER"),
            ] {
                let at = blocks.find(&format!("DELTASYNC_{name} = {{")).unwrap();
                let inbox = r#""_INBOX.>""#;
                let offset = at + blocks[at..].find(inbox).unwrap();
                let own = format!(r#""{}.>""#, inbox_prefix(&pipeline, role));
                blocks.replace_range(offset..offset + inbox.len(), &own);
            }
            assert!(!blocks.contains("_INBOX.>"));
        }
        let producer_password = random_secret();
        let consumer_password = random_secret();
        let admin_password = random_secret();
        let config = format!(
            r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}

{blocks}

authorization {{
  users: [
    {{ user: producer, password: "{producer_password}", permissions: $DELTASYNC_PRODUCER }}
    {{ user: consumer, password: "{consumer_password}", permissions: $DELTASYNC_CONSUMER }}
    {{ user: writer, password: "{admin_password}-writer", permissions: $DELTASYNC_WRITER }}
    {{ user: admin, password: "{admin_password}" }}
  ]
}}
"#
        );
        let server = NatsServer::start_with_config(&config);
        let role = |user: &str, password: String| {
            let mut s = settings(&server.url(), &pipeline);
            s.nats.user = Some(user.to_owned());
            s.nats.password = Some(Secret::new(password));
            if own_inboxes && user != "admin" {
                s.nats.inbox_prefix = Some(inbox_prefix(&pipeline, user));
            }
            s.snapshot.chunk_target_bytes = 16 * 1024;
            s.validate().unwrap();
            s
        };
        Secured {
            producer: role("producer", producer_password),
            consumer: role("consumer", consumer_password),
            admin: role("admin", admin_password),
            server,
        }
    }
}

/// A producer as the real one publishes: envelopes with a message id and the expected last
/// stream sequence, acks awaited.
struct Writer {
    js: jetstream::Context,
    settings: Settings,
    state: State,
    stream_seq: u64,
    prev: Option<(Manifest, State)>,
}

impl Writer {
    async fn start(settings: &Settings) -> Writer {
        let js = connect(settings).await;
        let stream = deltasync_nats::ensure_stream(&js, settings).await.unwrap();
        deltasync_nats::ensure_bucket(&js, settings).await.unwrap();
        Writer {
            stream_seq: stream.cached_info().state.last_sequence,
            js,
            settings: settings.clone(),
            state: State::new(Lineage::random()),
            prev: None,
        }
    }

    async fn commit(&mut self, changes: Vec<Change>) {
        let digest = self.state.apply_changes(&changes);
        let envelopes = split_transaction(
            self.state.lineage(),
            self.state.seq() + 1,
            digest,
            0,
            changes,
            4 * 1024,
        );
        let subject = names::subject(&self.settings.pipeline);
        for e in &envelopes {
            let msg = PublishMessage::build()
                .payload(encode_envelope(e).unwrap().into())
                .message_id(names::msg_id(&e.lineage.to_hex(), e.seq))
                .expected_last_sequence(self.stream_seq);
            let ack = self
                .js
                .send_publish(subject.clone(), msg)
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(!ack.duplicate);
            assert_eq!(ack.sequence, self.stream_seq + 1);
            self.stream_seq = ack.sequence;
        }
        let lineage = self.state.lineage();
        let last = envelopes.last().unwrap().seq;
        self.state.set_position(lineage, last);
    }

    async fn snapshot(&mut self) -> Manifest {
        let manifest = store::write_snapshot(
            &self.js,
            &self.settings,
            &self.state,
            self.stream_seq,
            self.prev.as_ref().map(|(m, s)| (m, s)),
        )
        .await
        .unwrap();
        self.prev = Some((manifest.clone(), self.state.clone()));
        manifest
    }
}

fn puts(range: std::ops::Range<usize>, tag: u8) -> Vec<Change> {
    range
        .map(|i| Change::put(format!("key-{i:05}"), vec![tag; 200]))
        .collect()
}

/// The producer role sets up the pipeline and writes two transactions and a snapshot between
/// them.
async fn produce(secured: &Secured) -> Writer {
    let mut w = Writer::start(&secured.producer).await;
    w.commit(puts(0..300, 1)).await;
    w.snapshot().await;
    w.commit(puts(100..400, 2)).await;
    w
}

// ---------------------------------------------------------------------------------------------
// Authentication and TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_authenticates_and_a_wrong_token_is_an_auth_error() {
    let token = random_secret();
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}
authorization {{ token: "{token}" }}
"#
    ));
    let mut s = settings(&server.url(), &unique_pipeline("token"));
    s.nats.token = Some(Secret::new(token.clone()));
    s.validate().unwrap();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    deltasync_nats::ensure_bucket(&js, &s).await.unwrap();

    let wrong = random_secret();
    s.nats.token = Some(Secret::new(wrong.clone()));
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::AuthorizationViolation);
    assert!(
        err.to_string().contains("nats.token"),
        "names the settings: {err}"
    );
    assert_hidden(&wrong, &format!("{err} {err:?}"), "the error");

    s.nats.token = None;
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::AuthorizationViolation);
}

#[tokio::test]
async fn an_nkey_seed_authenticates_and_an_unknown_nkey_is_an_auth_error() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}
authorization {{ users: [ {{ nkey: "{}" }} ] }}
"#,
        user.public_key()
    ));
    let mut s = settings(&server.url(), &unique_pipeline("nkey"));
    let seed = user.seed().unwrap();
    s.nats.nkey_seed = Some(Secret::new(seed.clone()));
    s.validate().unwrap();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    s.nats.nkey_seed = Some(Secret::new(stranger.clone()));
    s.validate().unwrap();
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::AuthorizationViolation);
    assert_hidden(&stranger, &format!("{err} {err:?}"), "the error");

    // A seed that is not one is refused before anything connects.
    s.nats.nkey_seed = Some(Secret::new("not-a-seed"));
    let err = s.validate().unwrap_err();
    assert!(err.to_string().contains("nats.nkey_seed"), "{err}");
}

#[tokio::test]
async fn a_creds_file_of_an_operator_signed_user_authenticates_with_jetstream() {
    let op = operator_setup();
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}
operator: "{operator}"
system_account: {system}
resolver: MEMORY
resolver_preload: {{
  {system}: "{system_jwt}"
  {account}: "{account_jwt}"
}}
"#,
        operator = op.operator_jwt,
        system = op.system_public,
        system_jwt = op.system_jwt,
        account = op.account_public,
        account_jwt = op.account_jwt,
    ));
    let mut s = settings(&server.url(), &unique_pipeline("creds"));
    s.nats.creds_file = Some(op.creds.clone());
    s.validate().unwrap();
    let (captured, guard) = Captured::start();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    let kv = deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
    kv.put("k", "v".into()).await.unwrap();
    drop(guard);
    assert_hidden(&op.user_seed, &captured.text(), "the log");

    // A user signed by an account the operator never signed: refused by the server.
    let rogue_account = nkeys::KeyPair::new_account();
    let rogue = nkeys::KeyPair::new_user();
    let rogue_jwt = nats_jwt_rs::user::User::new_claims("rogue".into(), rogue.public_key())
        .encode(&rogue_account)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rogue_creds = write(
        dir.path(),
        "rogue.creds",
        &creds_file(&rogue_jwt, &rogue.seed().unwrap()),
    );
    s.nats.creds_file = Some(rogue_creds);
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::AuthorizationViolation);

    // A file that is not a creds file: a clear error naming it, nothing sent.
    let garbage = write(dir.path(), "garbage.creds", "not a creds file\n");
    s.nats.creds_file = Some(garbage.clone());
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert!(
        matches!(&err, NatsError::Credentials { path, .. } if path == &garbage.display().to_string()),
        "{err:?}"
    );
}

#[tokio::test]
async fn tls_with_the_private_ca_connects_and_a_client_without_it_fails_with_a_tls_error() {
    let tls = tls_files();
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}
tls {{
  cert_file: "{}"
  key_file: "{}"
}}
"#,
        tls.server_cert.display(),
        tls.server_key.display()
    ));
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut s = settings(&url, &unique_pipeline("tls"));
    s.nats.tls.ca_file = Some(tls.ca.clone());
    s.validate().unwrap();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    assert!(js.client().server_info().tls_required);

    // Without the CA the server's certificate is not trusted (async-nats reports rustls's
    // verdict as an I/O error); the message says so and names the setting.
    s.nats.tls.ca_file = None;
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::Io);
    let text = err.to_string();
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer")
            && text.contains("set nats.tls.ca_file"),
        "the error says why: {text}"
    );

    // A plain nats:// URL with `tls.required` also refuses to go without TLS to a server that
    // offers it, and works with the CA.
    s.nats.url = server.url();
    s.nats.tls.required = true;
    s.nats.tls.ca_file = Some(tls.ca.clone());
    s.validate().unwrap();
    connect(&s).await;
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let tls = tls_files();
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
jetstream {{ store_dir: "{{store_dir}}" }}
tls {{
  cert_file: "{}"
  key_file: "{}"
  ca_file: "{}"
  verify: true
}}
"#,
        tls.server_cert.display(),
        tls.server_key.display(),
        tls.ca.display()
    ));
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut s = settings(&url, &unique_pipeline("mtls"));
    s.nats.tls.ca_file = Some(tls.ca.clone());
    s.nats.tls.cert_file = Some(tls.client_cert.clone());
    s.nats.tls.key_file = Some(tls.client_key.clone());
    s.validate().unwrap();
    let js = connect(&s).await;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();

    s.nats.tls.cert_file = None;
    s.nats.tls.key_file = None;
    s.validate().unwrap();
    let err = deltasync_nats::connect(&s.nats).await.unwrap_err();
    assert_connect_error(&err, ConnectErrorKind::Io);
    let text = err.to_string();
    assert!(
        text.contains("CertificateRequired") && text.contains("set nats.tls.cert_file"),
        "the error says why: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Least privilege
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_producer_role_can_do_everything_the_producer_does() {
    let secured = Secured::start("perm-producer");
    let mut s = secured.producer.clone();
    // gc removes superseded manifests and blobs at once (purges).
    s.snapshot.keep = 1;
    s.snapshot.gc_grace = Duration::ZERO;
    let mut w = Writer::start(&s).await;
    let js = w.js.clone();

    // Creating is covered by Writer::start; a second run updates changed limits.
    s.stream.max_messages = 50_000;
    s.snapshot.replicas = 1;
    s.stream.max_message_bytes = 512 * 1024;
    deltasync_nats::ensure_stream(&js, &s).await.unwrap();
    deltasync_nats::ensure_bucket(&js, &s).await.unwrap();
    let info = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    assert_eq!(info.cached_info().config.max_messages, 50_000);
    w.settings = s.clone();

    w.commit(puts(0..300, 1)).await;
    let first = w.snapshot().await;
    w.commit(puts(100..400, 2)).await;
    let second = w.snapshot().await;
    assert!(second.seq > first.seq);

    // Fencing reads a stored envelope back from the stream leader.
    let stream = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    let raw = stream.get_raw_message(w.stream_seq).await.unwrap();
    assert!(matches!(
        recovery::classify(&raw.payload),
        Classified::Envelope(e) if e.seq == w.state.seq()
    ));

    // Recovery: the snapshot, then the envelopes after it.
    let recovered = history::recover(&js, &s).await.unwrap().unwrap();
    assert_eq!(recovered.state.seq(), w.state.seq());
    assert_eq!(recovered.state.digest(), w.state.digest());

    // The snapshot store: latest, listing, gc of the superseded snapshot.
    let kv = store::bucket(&js, &s).await.unwrap();
    let loaded = store::load_latest(&kv, &s).await.unwrap().unwrap();
    assert_eq!(loaded.manifest.seq, second.seq);
    let report = store::gc(&kv, &s).await.unwrap();
    let manifests = store::list_manifests(&kv).await.unwrap();
    assert_eq!(manifests.len(), 1, "gc removed the first ({report:?})");

    let unexpected = flush_server_log(&secured.server, &js).await;
    assert!(
        unexpected.is_empty(),
        "the producer needed more than its permissions: {unexpected:#?}"
    );

    // And no more: it cannot delete its stream, create another, or write another pipeline's
    // bucket. (It can create consumers on its own stream: recovery reads it.)
    let short = deltasync_nats::jetstream(js.client(), &quick(&s).nats);
    let other = names::stream_name("someone-else");
    let other_key = format!("$KV.{}.latest", names::bucket_name("someone-else"));
    let (delete, create, foreign) = tokio::join!(
        short.delete_stream(names::stream_name(&s.pipeline)),
        short.create_stream(async_nats::jetstream::stream::Config {
            name: other.clone(),
            subjects: vec!["someone-else.>".into()],
            ..Default::default()
        }),
        async {
            let ack = short.publish(other_key.clone(), "x".into()).await?;
            ack.await.map_err(async_nats::Error::from)
        },
    );
    assert!(delete.is_err() && create.is_err() && foreign.is_err());
    for subject in [
        format!("$JS.API.STREAM.DELETE.{}", names::stream_name(&s.pipeline)),
        format!("$JS.API.STREAM.CREATE.{other}"),
        other_key,
    ] {
        violation_on(&secured.server, &subject).await;
    }
}

/// `s` with a short request timeout, for requests expected to be denied.
fn quick(s: &Settings) -> Settings {
    let mut q = s.clone();
    q.nats.request_timeout = DENIED_WAIT;
    q
}

/// Creates the durable pull consumer of replica `id`, as a consumer would.
async fn stream_consumer(
    js: &jetstream::Context,
    s: &Settings,
    id: &str,
) -> Result<jetstream::consumer::Consumer<pull::Config>, async_nats::Error> {
    let stream = js.get_stream(names::stream_name(&s.pipeline)).await?;
    Ok(stream
        .create_consumer(pull::Config {
            durable_name: Some(names::consumer_name(&s.pipeline, id)),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?)
}

#[tokio::test]
async fn the_consumer_role_can_read_the_stream_and_bucket_and_keep_its_own_consumer() {
    let secured = Secured::start("perm-consumer");
    let w = produce(&secured).await;
    let s = secured.consumer.clone();
    let js = connect(&s).await;

    // Following the stream with an ordered consumer.
    let mut tail = Tail::open(&js, &s, 1).await.unwrap();
    let mut envelopes = 0;
    let mut last = 0;
    while last < w.stream_seq {
        let item = tail
            .next_within(Duration::from_secs(5))
            .await
            .expect("the tail delivers")
            .unwrap();
        assert!(matches!(item.item, Classified::Envelope(_)));
        envelopes += 1;
        last = item.stream_seq;
    }
    assert_eq!(envelopes, w.stream_seq);
    drop(tail);

    // The snapshot bucket: the latest snapshot, verified; the manifest listing.
    let kv = store::bucket(&js, &s).await.unwrap();
    let loaded = store::load_latest(&kv, &s).await.unwrap().unwrap();
    assert_eq!(loaded.manifest.seq, w.prev.as_ref().unwrap().0.seq);
    assert_eq!(store::list_manifests(&kv).await.unwrap().len(), 1);
    let recovered = history::recover(&js, &s).await.unwrap().unwrap();
    assert_eq!(recovered.state.digest(), w.state.digest());

    // Its own durable pull consumer: create, read, ack, inspect, delete.
    let consumer = stream_consumer(&js, &s, "c1").await.unwrap();
    let mut batch = consumer.fetch().max_messages(10).messages().await.unwrap();
    let mut acked = 0;
    while let Some(msg) = batch.next().await {
        msg.unwrap().double_ack().await.unwrap();
        acked += 1;
    }
    assert_eq!(acked, 10);
    let stream = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    let name = names::consumer_name(&s.pipeline, "c1");
    let info = stream.consumer_info(&name).await.unwrap();
    assert_eq!(info.ack_floor.stream_sequence, 10);
    stream.reset_consumer(&name, Some(5)).await.unwrap();
    assert!(stream.delete_consumer(&name).await.unwrap().success);

    let unexpected = flush_server_log(&secured.server, &js).await;
    assert!(
        unexpected.is_empty(),
        "the consumer needed more than its permissions: {unexpected:#?}"
    );
}

#[tokio::test]
async fn the_consumer_role_cannot_publish_envelopes_write_the_bucket_or_touch_streams() {
    let secured = Secured::start("perm-deny");
    let w = produce(&secured).await;
    let s = quick(&secured.consumer);
    let js = connect(&s).await;
    let kv = store::bucket(&js, &s).await.unwrap();
    let stream_name = names::stream_name(&s.pipeline);
    let subject = names::subject(&s.pipeline);

    let envelope = async {
        let ack = js
            .send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload("forged".into())
                    .expected_last_sequence(w.stream_seq),
            )
            .await?;
        ack.await.map_err(async_nats::Error::from)
    };
    let (envelope, put, delete, create) = tokio::join!(
        envelope,
        kv.put(deltasync_core::snapshot::LATEST_KEY, "forged".into()),
        js.delete_stream(&stream_name),
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "DELTASYNC_forged".into(),
            subjects: vec!["deltasync.forged.envelopes".into()],
            ..Default::default()
        }),
    );
    let envelope = envelope.unwrap_err();
    assert!(
        matches!(
            envelope
                .downcast_ref::<async_nats::jetstream::context::PublishError>()
                .map(|e| e.kind()),
            Some(PublishErrorKind::TimedOut)
        ),
        "{envelope:?}"
    );
    assert!(put.is_err(), "writing the bucket is denied");
    assert!(delete.is_err(), "deleting the stream is denied");
    assert!(create.is_err(), "creating a stream is denied");
    violation_on(&secured.server, &subject).await;
    violation_on(
        &secured.server,
        &format!(
            "$KV.{}.{}",
            names::bucket_name(&s.pipeline),
            deltasync_core::snapshot::LATEST_KEY
        ),
    )
    .await;
    violation_on(
        &secured.server,
        &format!("$JS.API.STREAM.DELETE.{stream_name}"),
    )
    .await;
    violation_on(&secured.server, "$JS.API.STREAM.CREATE.DELTASYNC_forged").await;

    // Nor can it read another pipeline's stream or bucket.
    let (stream, bucket) = tokio::join!(
        js.get_stream(names::stream_name("someone-else")),
        js.get_key_value(names::bucket_name("someone-else")),
    );
    assert!(stream.is_err() && bucket.is_err());
    for subject in [
        format!("$JS.API.STREAM.INFO.{}", names::stream_name("someone-else")),
        format!(
            "$JS.API.STREAM.INFO.KV_{}",
            names::bucket_name("someone-else")
        ),
    ] {
        violation_on(&secured.server, &subject).await;
    }

    // Nothing changed: the producer's history and snapshot are intact.
    let pjs = connect(&secured.producer).await;
    let bounds = history::bounds(&pjs, &secured.producer).await.unwrap();
    assert_eq!(bounds.last_seq, w.stream_seq);
    let recovered = history::recover(&pjs, &secured.producer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recovered.state.digest(), w.state.digest());
}

#[tokio::test]
async fn the_consumer_service_runs_with_the_consumer_role() {
    let secured = Secured::start("perm-service");
    let w = produce(&secured).await;
    run_consumer_service(&secured, &w).await;
}

/// Runs the consumer crate's real code (bootstrap from the snapshot, follow to the head,
/// commit, position marker) once with the consumer credentials, and checks the replica, its
/// marker on the server, that it needed nothing it was not allowed, and that its status,
/// metrics and logs carry no secret.
async fn run_consumer_service(secured: &Secured, w: &Writer) {
    let s = secured.consumer.clone();
    let password = s.nats.password.as_ref().unwrap().expose().to_owned();
    let options = deltasync_consumer::Options {
        id: "replica-1".into(),
        storage: deltasync_consumer::Storage::Memory,
        http: None,
        once: true,
    };
    let consumer = deltasync_consumer::Consumer::new(s.clone(), options).unwrap();
    let replica = consumer.replica();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (captured, guard) = Captured::start();
    let outcome = tokio::time::timeout(Duration::from_secs(30), consumer.run(cancel))
        .await
        .expect("the consumer finishes")
        .unwrap();
    drop(guard);
    assert!(outcome.bootstrapped);
    assert_eq!(outcome.cursor.seq, w.state.seq());
    assert_eq!(outcome.cursor.digest, w.state.digest());
    let status = serde_json::to_string(&replica.status()).unwrap();
    assert!(status.contains(&w.state.digest().to_hex()), "{status}");
    let log = captured.text();
    assert!(
        log.contains("Connected to NATS"),
        "the capture works: {log}"
    );
    assert_hidden(&password, &status, "the consumer's status");
    assert_hidden(&password, &replica.metrics_text(), "the consumer's metrics");
    assert_hidden(&password, &log, "the consumer's log");

    // Its position marker is on the server.
    let js = connect(&s).await;
    let stream = js
        .get_stream(names::stream_name(&s.pipeline))
        .await
        .unwrap();
    let marker = names::consumer_name(&s.pipeline, "replica-1");
    let info = eventually("the marker consumer exists", Duration::from_secs(5), || {
        let stream = stream.clone();
        let marker = marker.clone();
        async move { stream.consumer_info(&marker).await }
    })
    .await;
    assert_eq!(info.name, marker);

    // The operator commands, with the same credentials.
    let status = deltasync_consumer::ops::status(&s).await.unwrap();
    assert!(
        status.consumers.iter().any(|c| c.name == marker),
        "{status:?}"
    );
    let status = serde_json::to_string(&status).unwrap();
    assert_hidden(&password, &status, "`deltasync-consumer status`");
    let verified = deltasync_consumer::ops::verify(&s, None).await.unwrap();
    assert!(verified.divergence.is_none(), "{verified:?}");
    let mut replayed = Vec::new();
    deltasync_consumer::ops::replay(&s, 1, None, &mut replayed)
        .await
        .unwrap();
    assert!(!replayed.is_empty());
    let dir = tempfile::tempdir().unwrap();
    deltasync_consumer::ops::rebuild(&s, w.state.seq(), dir.path())
        .await
        .unwrap();

    let unexpected = flush_server_log(&secured.server, &js).await;
    assert!(
        unexpected.is_empty(),
        "the consumer service needed more than its permissions: {unexpected:#?}"
    );
}

#[tokio::test]
async fn the_producer_service_runs_with_the_producer_role() {
    let secured = Secured::start("perm-producer-service");
    let s = secured.producer.clone();
    let password = s.nats.password.as_ref().unwrap().expose().to_owned();
    let (captured, guard) = Captured::start();
    // Start (create the stream and bucket, new lineage), commit, snapshot, commit, stop.
    let producer = deltasync_producer::Producer::start(s.clone())
        .await
        .unwrap();
    producer.commit(puts(0..300, 1)).await.unwrap();
    producer.snapshot().await.unwrap();
    let last = producer.commit(puts(100..400, 2)).await.unwrap();
    let observer = producer.observer();
    let running = serde_json::to_string(&observer.status()).unwrap();
    let metrics = observer.metrics_text();
    let stopped = serde_json::to_string(&producer.shutdown().await.unwrap()).unwrap();
    // Start again: recovery from the snapshot and the envelopes after it; continue.
    let producer = deltasync_producer::Producer::start(s.clone())
        .await
        .unwrap();
    assert_eq!(producer.status().seq, last.last_seq);
    producer.commit(puts(0..10, 3)).await.unwrap();
    producer.shutdown().await.unwrap();
    // `deltasync-producer status`.
    let pipeline = deltasync_producer::ops::pipeline_status(&s).await.unwrap();
    let pipeline = serde_json::to_string(&pipeline).unwrap();
    drop(guard);
    let log = captured.text();
    assert!(
        log.contains("Connected to NATS"),
        "the capture works: {log}"
    );
    for (what, text) in [
        ("the running status", &running),
        ("the metrics", &metrics),
        ("the final status", &stopped),
        ("the pipeline status", &pipeline),
        ("the log", &log),
    ] {
        assert_hidden(&password, text, what);
    }

    let unexpected = flush_server_log(&secured.server, &connect(&secured.consumer).await).await;
    assert!(
        unexpected.is_empty(),
        "the producer service needed more than its permissions: {unexpected:#?}"
    );
}

#[tokio::test]
async fn ordered_readers_that_recreate_their_consumer_stay_within_both_roles() {
    let secured = Secured::start("perm-recreate");
    let mut w = produce(&secured).await;
    let admin = connect(&secured.admin).await;
    let stream = admin
        .get_stream(names::stream_name(&secured.producer.pipeline))
        .await
        .unwrap();
    for (round, role) in [&secured.producer, &secured.consumer]
        .into_iter()
        .enumerate()
    {
        let js = connect(role).await;
        let mut tail = Tail::open(&js, role, 1).await.unwrap();
        let mut last = 0;
        while last < w.stream_seq {
            last = next_in_order(&mut tail, last).await;
        }
        // The tail's ordered consumer vanishes (as after a server restart or an operator's
        // cleanup): async-nats deletes its remains and creates a successor by name.
        let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
        // (The previous round's reader may still be there until it times out.)
        assert!(!names.is_empty());
        for name in &names {
            assert!(stream.delete_consumer(name).await.unwrap().success);
        }
        w.commit(puts(0..50, 10 + round as u8)).await;
        while last < w.stream_seq {
            last = next_in_order(&mut tail, last).await;
        }
    }
    let unexpected = flush_server_log(&secured.server, &connect(&secured.consumer).await).await;
    assert!(
        unexpected.is_empty(),
        "re-creating ordered consumers needs more than the roles allow: {unexpected:#?}"
    );
}

#[tokio::test]
async fn listing_a_large_bucket_answers_flow_control_within_both_roles() {
    let secured = Secured::start("perm-flow");
    let w = Writer::start(&secured.producer).await;
    // Blobs as write_snapshot writes them: plain pipelined publishes. From several thousand
    // keys on, the server paces a key listing with flow-control requests the client must
    // answer on `$JS.FC.<stream>.>`; unanswered, the listing stalls.
    let bucket = names::bucket_name(&secured.producer.pipeline);
    let mut acks = Vec::new();
    for i in 0..12_000 {
        let subject = format!("$KV.{bucket}.chunk.{i:06}");
        acks.push(w.js.publish(subject, "v".into()).await.unwrap());
        if acks.len() >= 512 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    for role in [&secured.producer, &secured.consumer] {
        let js = connect(role).await;
        let kv = store::bucket(&js, role).await.unwrap();
        let listed = tokio::time::timeout(Duration::from_secs(20), store::list_manifests(&kv))
            .await
            .expect("the listing does not stall")
            .unwrap();
        assert!(listed.is_empty());
    }
    let unexpected = flush_server_log(&secured.server, &connect(&secured.consumer).await).await;
    assert!(
        unexpected.is_empty(),
        "listing the bucket needs more than the roles allow: {unexpected:#?}"
    );
}

/// The tail's next message, which must follow `last`; returns its stream sequence.
async fn next_in_order(tail: &mut Tail, last: u64) -> u64 {
    let item = tail
        .next_within(Duration::from_secs(10))
        .await
        .expect("the tail delivers")
        .unwrap();
    assert_eq!(item.stream_seq, last + 1);
    item.stream_seq
}

#[tokio::test]
async fn with_own_inbox_prefixes_the_roles_work_and_cannot_listen_to_other_replies() {
    let secured = Secured::start_with("perm-inbox", true);
    let w = produce(&secured).await;
    run_consumer_service(&secured, &w).await;
    let js = connect(&secured.consumer).await;
    let kv = store::bucket(&js, &secured.consumer).await.unwrap();
    assert_eq!(store::list_manifests(&kv).await.unwrap().len(), 1);

    // Listening to everyone's replies is refused.
    let _sub = js.client().subscribe("_INBOX.>").await.unwrap();
    js.client().flush().await.unwrap();
    let line = violation_on(&secured.server, "_INBOX.>").await;
    assert!(line.contains("Subscription Violation"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn secrets_appear_in_no_log_error_debug_output_or_serialized_settings() {
    let password = random_secret();
    let token = random_secret();
    let user_key = nkeys::KeyPair::new_user();
    let seed = user_key.seed().unwrap();
    let secrets = [password.as_str(), token.as_str(), seed.as_str()];

    // Settings loaded from the environment, one authentication method each.
    let load = |vars: &[(&str, &str)]| {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_from(Sources {
            env: EnvVars::Map(env),
            ..Sources::default()
        })
        .unwrap()
    };
    let with_password = load(&[
        ("DELTASYNC_NATS__USER", "app"),
        ("DELTASYNC_NATS__PASSWORD", &password),
    ]);
    let with_token = load(&[("DELTASYNC_NATS__TOKEN", &token)]);
    let with_seed = load(&[("DELTASYNC_NATS__NKEY_SEED", &seed)]);
    assert_eq!(
        with_password.nats.password.as_ref().unwrap().expose(),
        password
    );
    assert_eq!(with_token.nats.token.as_ref().unwrap().expose(), token);
    assert_eq!(with_seed.nats.nkey_seed.as_ref().unwrap().expose(), seed);
    for s in [&with_password, &with_token, &with_seed] {
        let shown = format!(
            "{s:?}\n{:#?}\n{}\n{}",
            s,
            serde_json::to_string(s).unwrap(),
            serde_json::to_string_pretty(&s.nats).unwrap()
        );
        for secret in secrets {
            assert_hidden(secret, &shown, "the settings' Debug or JSON");
        }
    }

    // Connecting, successfully and not, with everything logged.
    let server = NatsServer::start_with_config(&format!(
        r#"
listen: "127.0.0.1:{{port}}"
authorization {{
  users: [
    {{ user: app, password: "{password}" }}
    {{ nkey: "{}" }}
  ]
}}
"#,
        user_key.public_key()
    ));
    let (captured, guard) = Captured::start();
    let mut errors = String::new();
    for mut s in [with_password, with_token, with_seed] {
        s.nats.url = server.url();
        let client = deltasync_nats::connect(&s.nats).await;
        match &client {
            Ok(c) => c.flush().await.unwrap(),
            Err(e) => errors.push_str(&format!("{e}\n{e:?}\n")),
        }
    }
    // Failing authentications: a wrong password (the right one's prefix), a wrong seed.
    let mut wrong = load(&[
        ("DELTASYNC_NATS__USER", "app"),
        ("DELTASYNC_NATS__PASSWORD", &format!("{password}x")),
    ]);
    wrong.nats.url = server.url();
    let err = deltasync_nats::connect(&wrong.nats).await.unwrap_err();
    errors.push_str(&format!("{err}\n{err:?}\n"));
    drop(guard);
    let log = captured.text();
    assert!(
        log.contains("Connected to NATS") && log.contains("async_nats"),
        "the capture sees deltasync's and async-nats's own events: {log}"
    );
    assert!(
        errors.contains("authorization violation"),
        "the token is refused by a users-only server: {errors}"
    );
    for secret in secrets {
        assert_hidden(secret, &log, "the log");
        assert_hidden(secret, &errors, "the errors");
    }
    assert_hidden(&format!("{password}x"), &log, "the log");
    assert_hidden(&format!("{password}x"), &errors, "the errors");
}
