//! The connection to the broker and the confirm-mode channels on it.
//!
//! One AMQP connection per sink, opened lazily and again after it broke;
//! every (re)connect declares the topology (exchange, queues, bindings) so
//! a broker that lost them (a new node, a deleted exchange) gets them back
//! before the first message. Channels are opened in confirm mode
//! (`confirm.select`) and handed to the publisher; a channel that saw any
//! failure is dropped, never reused (its confirm bookkeeping can no longer
//! be trusted), and a connection whose confirms timed out is closed and
//! replaced (it may be half-dead; heartbeats take longer to notice).
//!
//! lapin's own automatic recovery is not used: it replays publishes and
//! confirms on its own schedule, while the runtime's rule is simpler to
//! prove: a batch that did not get all its acks fails and is published
//! again, from the start, on a fresh channel.
//!
//! The password is held apart from the URL: lapin gets a URL without it
//! (amq-protocol logs the URL at trace level) and the credentials through
//! an [`AuthProvider`] backed by a [`SecretString`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lapin::{
    Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind,
    auth::AuthProvider,
    options::{
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    tcp::OwnedTLSConfig,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::{AMQPUri, SASLMechanism},
};
use secrecy::{ExposeSecret, SecretString};

use super::config::{QueueConfig, QueueType, RabbitMqSinkConfig, is_tls};
use crate::sink::SinkError;

/// Everything needed to (re)connect, resolved once.
pub(crate) struct Settings {
    /// lapin's URL, with the password removed.
    uri: AMQPUri,
    user: String,
    password: SecretString,
    tls: OwnedTLSConfig,
    /// `host:port`, for messages.
    pub(crate) host_port: String,
    /// `amqp://user@host:port/vhost`, for messages (no password).
    pub(crate) endpoint: String,
    pub(crate) exchange: String,
    declare_exchange: bool,
    queues: Vec<QueueConfig>,
    connection_name: String,
    pub(crate) connect_timeout: Duration,
}

impl Settings {
    /// `url` is the resolved URL (from `url`, `url_env` or `url_file`).
    pub(crate) fn new(config: &RabbitMqSinkConfig, url: &str) -> Result<Self, SinkError> {
        let mut uri = super::config::parse_amqp_url(url).map_err(|e| {
            SinkError::Permanent(format!(
                "rabbitmq sink: the broker URL ({}) is invalid: {e}",
                super::config::redact_url(url)
            ))
        })?;
        if uri
            .query
            .auth_mechanism
            .is_some_and(|m| m != SASLMechanism::Plain)
        {
            return Err(SinkError::Permanent(
                "rabbitmq sink: only auth_mechanism=plain (user and password in the URL) is supported".to_string(),
            ));
        }
        let password = SecretString::from(std::mem::take(&mut uri.authority.userinfo.password));
        let user = uri.authority.userinfo.username.clone();
        let host_port = format!("{}:{}", uri.authority.host, uri.authority.port);
        let vhost = utf8_percent_encode_vhost(&uri.vhost);
        let endpoint = format!("{}://{}@{}/{}", uri.scheme, user, host_port, vhost);
        let mut tls = OwnedTLSConfig::default();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                SinkError::Permanent(format!(
                    "rabbitmq sink: cannot read ca_file `{}`: {e}",
                    path.display()
                ))
            })?;
            tls.cert_chain = Some(pem);
        }
        if !is_tls(&uri) && !is_loopback(&uri.authority.host) {
            tracing::warn!(
                broker = %host_port,
                "The RabbitMQ URL uses plain amqp:// to a host other than loopback: the password and the events travel unencrypted. Use amqps:// (port 5671)."
            );
        }
        Ok(Self {
            uri,
            user,
            password,
            tls,
            host_port,
            endpoint,
            exchange: config.exchange.clone(),
            declare_exchange: config.declare_exchange,
            queues: config.declare_queues.clone(),
            connection_name: config.connection_name.clone(),
            connect_timeout: config.connect_timeout,
        })
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn utf8_percent_encode_vhost(vhost: &str) -> String {
    percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// SASL PLAIN with the password from a [`SecretString`].
struct PlainAuth {
    user: String,
    password: SecretString,
}

impl AuthProvider for PlainAuth {
    fn mechanism(&self) -> ShortString {
        "PLAIN".into()
    }

    fn auth_starter(&self) -> Result<LongString, String> {
        Ok(format!("\0{}\0{}", self.user, self.password.expose_secret()).into())
    }
}

/// An open connection and its generation (bumped by every reconnect).
#[derive(Clone)]
pub(crate) struct Live {
    conn: Arc<Connection>,
    pub(crate) generation: u64,
}

/// A channel in confirm mode, with the generation of its connection.
pub(crate) struct ConfirmChannel {
    pub(crate) channel: Channel,
    pub(crate) generation: u64,
}

struct State {
    live: Option<Live>,
    /// Declare the topology again before the next channel (after a
    /// failure that a missing exchange, queue or binding may explain).
    redeclare: bool,
}

/// Why an AMQP request failed.
enum RpcError {
    Broker(lapin::Error),
    Timeout,
}

/// Owns the connection; hands out confirm channels.
pub(crate) struct Connector {
    pub(crate) settings: Settings,
    state: tokio::sync::Mutex<State>,
    generations: AtomicU64,
}

impl Connector {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            state: tokio::sync::Mutex::new(State {
                live: None,
                redeclare: false,
            }),
            generations: AtomicU64::new(0),
        }
    }

    /// The open connection; connects (and declares the topology) if there
    /// is none or the last one broke.
    pub(crate) async fn connection(&self) -> Result<Live, SinkError> {
        let mut state = self.state.lock().await;
        if let Some(l) = state.live.clone() {
            if l.conn.status().connected() {
                if state.redeclare {
                    self.declare_topology(&l.conn).await?;
                    state.redeclare = false;
                }
                return Ok(l);
            }
            tracing::info!(broker = %self.settings.host_port, "The RabbitMQ connection was lost; reconnecting.");
        }
        state.live = None;
        let conn = self.connect().await?;
        if let Err(e) = self.declare_topology(&conn).await {
            close_quietly(&conn).await;
            return Err(e);
        }
        state.redeclare = false;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let l = Live {
            conn: Arc::new(conn),
            generation,
        };
        state.live = Some(l.clone());
        tracing::info!(broker = %self.settings.host_port, exchange = %self.settings.exchange, generation, "Connected to RabbitMQ.");
        Ok(l)
    }

    /// A new channel in confirm mode.
    pub(crate) async fn confirm_channel(&self) -> Result<ConfirmChannel, SinkError> {
        let live = self.connection().await?;
        let what = "opening a confirm-mode channel";
        let channel = self
            .rpc(live.conn.create_channel())
            .await
            .map_err(|e| self.rpc_error(what, e))?;
        self.rpc(channel.confirm_select(ConfirmSelectOptions::default()))
            .await
            .map_err(|e| self.rpc_error(what, e))?;
        Ok(ConfirmChannel {
            channel,
            generation: live.generation,
        })
    }

    /// Declare the topology again before the next channel is handed out.
    pub(crate) async fn redeclare_topology(&self) {
        self.state.lock().await.redeclare = true;
    }

    /// Closes the connection of `generation` if it is still the current
    /// one: the next channel comes from a new connection.
    pub(crate) async fn discard(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state
            .live
            .as_ref()
            .is_some_and(|l| l.generation == generation)
            && let Some(l) = state.live.take()
        {
            tracing::info!(broker = %self.settings.host_port, generation, "Closing the RabbitMQ connection after a failure; the next publish reconnects.");
            close_quietly(&l.conn).await;
        }
    }

    /// Whether the broker blocked the connection of `generation`
    /// (`connection.blocked`: a memory or disk alarm).
    pub(crate) async fn is_blocked(&self, generation: u64) -> bool {
        let state = self.state.lock().await;
        state
            .live
            .as_ref()
            .is_some_and(|l| l.generation == generation && l.conn.status().blocked())
    }

    /// Closes the connection (shutdown).
    pub(crate) async fn close(&self) {
        if let Some(l) = self.state.lock().await.live.take() {
            close_quietly(&l.conn).await;
        }
    }

    pub(crate) async fn connect(&self) -> Result<Connection, SinkError> {
        let s = &self.settings;
        let properties = ConnectionProperties::default()
            .with_connection_name(s.connection_name.clone().into())
            .with_client_property("product".into(), "graphdelta".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into())
            .with_auth_provider(PlainAuth {
                user: s.user.clone(),
                password: s.password.clone(),
            });
        let runtime = lapin::runtime::default_runtime().map_err(|e| {
            SinkError::Permanent(format!("rabbitmq sink: no async runtime for lapin: {e}"))
        })?;
        let connecting =
            Connection::connect_uri_with_config(s.uri.clone(), properties, s.tls.clone(), runtime);
        match tokio::time::timeout(s.connect_timeout, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.connect_error(&e)),
            Err(_) => Err(SinkError::Retriable(format!(
                "rabbitmq broker {} ({}) did not complete the connection within {:?}; check that RabbitMQ runs and that host and port in sink.url are reachable from here (firewall, DNS), or raise sink.connect_timeout",
                s.host_port, s.endpoint, s.connect_timeout
            ))),
        }
    }

    fn connect_error(&self, e: &lapin::Error) -> SinkError {
        let s = &self.settings;
        match (e.kind(), amqp_kind(e)) {
            (_, Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))) => {
                SinkError::Permanent(format!(
                    "rabbitmq broker {} refused the login of user `{}` ({}): check the user name and password in the sink URL (sink.url, or the variable or file it comes from)",
                    s.host_port,
                    s.user,
                    describe(e)
                ))
            }
            (_, Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED))) => {
                SinkError::Permanent(format!(
                    "rabbitmq broker {} refused access to vhost `{}` for user `{}` ({}): create the vhost (`rabbitmqctl add_vhost`) or grant the user permissions on it (`rabbitmqctl set_permissions -p <vhost> <user> '.*' '.*' '.*'`)",
                    s.host_port,
                    s.uri.vhost,
                    s.user,
                    describe(e)
                ))
            }
            (ErrorKind::IOError(io), _) => SinkError::Retriable(format!(
                "cannot connect to rabbitmq broker {} ({}): {io}; check that RabbitMQ runs and listens there (`rabbitmqctl status`, `rabbitmq-diagnostics listeners`) and that the sink URL names the right host and port",
                s.host_port, s.endpoint
            )),
            _ => SinkError::Retriable(format!(
                "cannot connect to rabbitmq broker {} ({}): {}",
                s.host_port,
                s.endpoint,
                describe(e)
            )),
        }
    }

    /// Declares the exchange, the queues and their bindings on a channel of
    /// its own (a refused declaration closes the channel it was made on).
    async fn declare_topology(&self, conn: &Connection) -> Result<(), SinkError> {
        let s = &self.settings;
        let channel = self
            .rpc(conn.create_channel())
            .await
            .map_err(|e| self.rpc_error("opening a channel", e))?;
        let exchange = ShortString::from(s.exchange.as_str());
        let options = ExchangeDeclareOptions {
            passive: !s.declare_exchange,
            durable: true,
            ..Default::default()
        };
        self.rpc(channel.exchange_declare(
            exchange.clone(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        ))
        .await
        .map_err(|e| match soft_error(&e) {
            Some(AMQPSoftError::NOTFOUND) => SinkError::Permanent(format!(
                "rabbitmq exchange `{}` does not exist on {} and sink.declare_exchange = false: create it, or set declare_exchange = true",
                s.exchange, s.host_port
            )),
            Some(AMQPSoftError::PRECONDITIONFAILED) => SinkError::Permanent(format!(
                "rabbitmq exchange `{}` exists with another type or durability than a durable topic exchange ({}): pick another sink.exchange, or set declare_exchange = false to publish to it as it is",
                s.exchange,
                rpc_describe(&e)
            )),
            Some(AMQPSoftError::ACCESSREFUSED) => SinkError::Permanent(format!(
                "rabbitmq user `{}` may not declare exchange `{}` ({}): grant `configure` permission on it, or create the exchange and set declare_exchange = false",
                s.user,
                s.exchange,
                rpc_describe(&e)
            )),
            _ => self.rpc_error("declaring the exchange", e),
        })?;
        for q in &s.queues {
            self.rpc(channel.queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_arguments(q),
            ))
            .await
            .map_err(|e| match soft_error(&e) {
                Some(AMQPSoftError::PRECONDITIONFAILED) => SinkError::Permanent(format!(
                    "rabbitmq queue `{}` already exists with other arguments than sink.declare_queues asks for (type = \"{}\"; {}): align the settings with the existing queue, or delete it (`rabbitmqctl delete_queue {}`)",
                    q.name,
                    q.queue_type.as_str(),
                    rpc_describe(&e),
                    q.name
                )),
                Some(AMQPSoftError::ACCESSREFUSED) => SinkError::Permanent(format!(
                    "rabbitmq user `{}` may not declare queue `{}` ({}): grant `configure` permission on it, or remove it from sink.declare_queues",
                    s.user,
                    q.name,
                    rpc_describe(&e)
                )),
                _ => self.rpc_error(&format!("declaring queue `{}`", q.name), e),
            })?;
            for key in &q.binding_keys {
                self.rpc(channel.queue_bind(
                    q.name.as_str().into(),
                    exchange.clone(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ))
                .await
                .map_err(|e| {
                    self.rpc_error(&format!("binding queue `{}` with key `{key}`", q.name), e)
                })?;
            }
        }
        let _ = self.rpc(channel.close(200, "OK".into())).await;
        Ok(())
    }

    /// Runs one AMQP request with the connect timeout (a half-dead
    /// connection never answers).
    async fn rpc<T>(&self, fut: impl Future<Output = lapin::Result<T>>) -> Result<T, RpcError> {
        match tokio::time::timeout(self.settings.connect_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RpcError::Broker(e)),
            Err(_) => Err(RpcError::Timeout),
        }
    }

    fn rpc_error(&self, what: &str, e: RpcError) -> SinkError {
        let s = &self.settings;
        let message = format!(
            "rabbitmq broker {}, exchange `{}`: {what} failed: {}",
            s.host_port,
            s.exchange,
            rpc_describe(&e)
        );
        match e {
            RpcError::Broker(e) => classify(&e, message),
            RpcError::Timeout => SinkError::Retriable(message),
        }
    }
}

fn rpc_describe(e: &RpcError) -> String {
    match e {
        RpcError::Broker(e) => describe(e),
        RpcError::Timeout => "no answer within the connect timeout".to_string(),
    }
}

fn soft_error(e: &RpcError) -> Option<&AMQPSoftError> {
    match e {
        RpcError::Broker(e) => match amqp_kind(e) {
            Some(AMQPErrorKind::Soft(soft)) => Some(soft),
            _ => None,
        },
        RpcError::Timeout => None,
    }
}

fn amqp_kind(e: &lapin::Error) -> Option<&AMQPErrorKind> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.kind()),
        _ => None,
    }
}

/// Closes a connection politely, without waiting long for a broker that
/// may not answer any more.
async fn close_quietly(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "OK".into())).await;
    }
}

/// The queue's `x-` arguments.
pub(crate) fn queue_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    // Classic is the default type: declaring it explicitly would make the
    // declaration differ from a queue created without the argument.
    if q.queue_type != QueueType::Classic {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(q.queue_type.as_str().into()),
        );
    }
    if let Some(age) = q.max_age {
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", age.as_secs()).into()),
        );
    }
    let int = |v: u64| AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX));
    if let Some(bytes) = q.max_length_bytes {
        args.insert("x-max-length-bytes".into(), int(bytes));
    }
    if let Some(bytes) = q.max_segment_size_bytes {
        args.insert("x-stream-max-segment-size-bytes".into(), int(bytes));
    }
    args
}

/// A lapin error in words: the broker's reply text when there is one.
pub(crate) fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            format!("{} ({})", amqp.get_message(), amqp.get_id())
        }
        _ => e.to_string(),
    }
}

/// Whether another attempt can help: refused permissions, inequivalent
/// declarations and oversized messages need an operator; lost connections,
/// closed channels and missing exchanges (declared again on the next
/// attempt) do not.
pub(crate) fn classify(e: &lapin::Error, message: String) -> SinkError {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::CONTENTTOOLARGE,
            )
            | AMQPErrorKind::Hard(
                AMQPHardError::NOTALLOWED
                | AMQPHardError::NOTIMPLEMENTED
                | AMQPHardError::FRAMEERROR
                | AMQPHardError::SYNTAXERROR,
            ) => SinkError::Permanent(message),
            _ => SinkError::Retriable(message),
        },
        ErrorKind::ChannelsLimitReached | ErrorKind::InvalidProtocolVersion(_) => {
            SinkError::Permanent(message)
        }
        _ => SinkError::Retriable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RabbitMqSinkConfig {
        toml::from_str(&format!("url = '{url}'")).unwrap()
    }

    #[test]
    fn the_password_is_kept_out_of_lapins_url() {
        let c = config("amqp://svc:s%40cret@rabbit.internal:5673/prod?heartbeat=5");
        let s = Settings::new(&c, c.url.as_ref().unwrap().expose()).unwrap();
        assert_eq!(s.uri.authority.userinfo.password, "");
        assert_eq!(s.password.expose_secret(), "s@cret");
        assert_eq!(s.user, "svc");
        assert_eq!(s.host_port, "rabbit.internal:5673");
        assert_eq!(s.endpoint, "amqp://svc@rabbit.internal:5673/prod");
        assert!(!format!("{:?}", s.uri).contains("cret"));
        assert_eq!(s.uri.query.heartbeat, Some(5));
        let auth = PlainAuth {
            user: s.user.clone(),
            password: s.password.clone(),
        };
        assert_eq!(auth.auth_starter().unwrap().as_bytes(), b"\0svc\0s@cret");
    }

    #[test]
    fn default_vhost_is_shown_encoded() {
        let c = config("amqp://guest:guest@127.0.0.1:5672/%2f");
        let s = Settings::new(&c, c.url.as_ref().unwrap().expose()).unwrap();
        assert_eq!(s.endpoint, "amqp://guest@127.0.0.1:5672/%2F");
    }

    #[test]
    fn stream_queue_arguments() {
        let q: QueueConfig = toml::from_str(
            "name='q'\ntype='stream'\nmax_age='7days'\nmax_length_bytes=5000000000\nmax_segment_size_bytes=100000000",
        )
        .unwrap();
        let args = queue_arguments(&q);
        let a = args.inner();
        assert_eq!(
            a.get("x-queue-type"),
            Some(&AMQPValue::LongString("stream".into()))
        );
        assert_eq!(
            a.get("x-max-age"),
            Some(&AMQPValue::LongString("604800s".into()))
        );
        assert_eq!(
            a.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(5_000_000_000))
        );
        let classic: QueueConfig = toml::from_str("name='q'\ntype='classic'").unwrap();
        assert!(queue_arguments(&classic).inner().is_empty());
    }
}
