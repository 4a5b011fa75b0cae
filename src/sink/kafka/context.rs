//! Where librdkafka's own logs and error callbacks go: into `tracing`, at
//! levels that follow the project's rule (ERROR only when an operator must
//! act). librdkafka reports every dropped connection or unreachable broker
//! as an "error"; the sink already turns what matters into a retriable or
//! permanent [`SinkError`](crate::sink::SinkError), so these are warnings.

use rdkafka::{
    ClientContext,
    config::RDKafkaLogLevel,
    consumer::ConsumerContext,
    error::{KafkaError, RDKafkaErrorCode},
};

/// The context of every client the sink creates.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkContext {
    /// `producer`, `admin` or `checkpoint-reader`, for the logs.
    pub client: &'static str,
}

impl SinkContext {
    pub const fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let client = self.client;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", client, facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", client, facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", client, facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let client = self.client;
        match error.rdkafka_error_code() {
            // The checkpoint reader asks for end-of-partition events; they
            // are progress, not trouble.
            Some(RDKafkaErrorCode::PartitionEOF) => {
                tracing::trace!(target: "librdkafka", client, "{reason}")
            }
            _ => tracing::warn!(target: "librdkafka", client, error = %error, "{reason}"),
        }
    }
}

impl ConsumerContext for SinkContext {}
