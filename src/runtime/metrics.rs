//! Every metric graphdelta exports, named once. Labels are low-cardinality:
//! `stream`, `change`, `status`, `kind`, `sink`, `outcome` — never an object
//! id, a URL or a tenant-controlled string other than the configured stream
//! name.

/// Events published and acknowledged, by `stream` and `change`.
pub const EVENTS_PUBLISHED: &str = "graphdelta_events_published_total";
/// Graph HTTP requests by `status` (200, 401, 410, 429, 503, 504, 4xx, 5xx).
pub const GRAPH_REQUESTS: &str = "graphdelta_graph_requests_total";
/// Graph requests retried, by `kind` (throttled, http_5xx, transport, ...).
pub const GRAPH_RETRIES: &str = "graphdelta_graph_retries_total";
/// Seconds spent waiting on Graph's `Retry-After` after 429s.
pub const GRAPH_THROTTLED_SECONDS: &str = "graphdelta_graph_throttled_wait_seconds_total";
/// Time to fetch one page (request to last byte).
pub const GRAPH_PAGE_SECONDS: &str = "graphdelta_graph_page_seconds";
/// Pages processed, by `stream`.
pub const PAGES: &str = "graphdelta_pages_total";
/// Delta rounds completed (deltaLink reached), by `stream`.
pub const ROUNDS: &str = "graphdelta_rounds_completed_total";
/// Full resync rounds started because Graph reset the sync state, by `stream`.
pub const RESYNCS: &str = "graphdelta_resyncs_total";
/// Time from handing a batch to the sink to its acknowledgement, by `sink`.
pub const PUBLISH_SECONDS: &str = "graphdelta_batch_publish_seconds";
/// Sink errors by `sink` and `outcome` (retriable, permanent, fenced).
pub const SINK_ERRORS: &str = "graphdelta_sink_errors_total";
/// Seconds since the stream's last checkpoint commit, by `stream`.
pub const CHECKPOINT_AGE: &str = "graphdelta_checkpoint_age_seconds";
/// Objects the connector remembers, by `stream`.
pub const OBJECTS_REMEMBERED: &str = "graphdelta_objects_remembered";
/// Stream errors that ended a round, by `stream` and `kind`.
pub const STREAM_ERRORS: &str = "graphdelta_stream_errors_total";
/// Checkpoint commits the stream had to wait for, by `stream`.
pub const COMMIT_WAITS: &str = "graphdelta_commit_waits_total";

/// Registers descriptions with the installed recorder (if any).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(EVENTS_PUBLISHED, "Change events acknowledged by the sink.");
    describe_counter!(GRAPH_REQUESTS, "Microsoft Graph HTTP requests by status.");
    describe_counter!(
        GRAPH_RETRIES,
        "Microsoft Graph requests retried, by kind of failure."
    );
    describe_counter!(
        GRAPH_THROTTLED_SECONDS,
        Unit::Seconds,
        "Seconds waited on Retry-After after 429 responses."
    );
    describe_histogram!(
        GRAPH_PAGE_SECONDS,
        Unit::Seconds,
        "Time to fetch one delta page."
    );
    describe_counter!(PAGES, "Delta pages processed.");
    describe_counter!(ROUNDS, "Delta rounds completed.");
    describe_counter!(
        RESYNCS,
        "Full resync rounds started after Graph reset the sync state."
    );
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Time from publishing a batch to its acknowledgement."
    );
    describe_counter!(SINK_ERRORS, "Sink failures by outcome.");
    describe_gauge!(
        CHECKPOINT_AGE,
        Unit::Seconds,
        "Seconds since the last checkpoint commit."
    );
    describe_gauge!(
        OBJECTS_REMEMBERED,
        "Objects remembered in the checkpoint store."
    );
    describe_counter!(STREAM_ERRORS, "Errors that ended a stream's round.");
    describe_counter!(
        COMMIT_WAITS,
        "Checkpoint commits the stream stopped for: the checkpoint store was slower than Graph and the sink."
    );
}
