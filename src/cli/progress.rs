//! Progress bars for full rounds (initial sync, resync) on a terminal:
//! objects so far, pages, rate. Log lines are printed above the bars (see
//! [`super::logging`]), so the two never garble each other.

use std::{collections::HashMap, sync::OnceLock, time::Duration};

use graphdelta::runtime::StatusRegistry;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// The terminal's bars, if stderr is a terminal.
pub fn multi() -> Option<&'static MultiProgress> {
    static MULTI: OnceLock<Option<MultiProgress>> = OnceLock::new();
    MULTI
        .get_or_init(|| {
            use std::io::IsTerminal;
            std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)))
        })
        .as_ref()
}

/// Draws a bar per stream in a full round until `stop`.
pub fn spawn(
    status: StatusRegistry,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let multi = multi()?;
    Some(tokio::spawn(async move {
        let style = ProgressStyle::with_template(
            "{spinner:.green} {prefix:.bold} {msg} [{elapsed_precise}] {human_pos} objects ({per_sec})",
        )
        .expect("valid template");
        let mut bars: HashMap<String, ProgressBar> = HashMap::new();
        loop {
            for s in status.snapshot() {
                let full = matches!(s.phase.as_str(), "initial" | "resync" | "reconcile")
                    && s.state == "running";
                match (full, bars.get(&s.stream)) {
                    (true, Some(bar)) => {
                        bar.set_position(s.round_objects);
                        bar.set_message(format!("{} round, {} pages", s.phase, s.round_pages));
                    }
                    (true, None) => {
                        let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                        bar.set_prefix(s.stream.clone());
                        bar.enable_steady_tick(Duration::from_millis(120));
                        bars.insert(s.stream.clone(), bar);
                    }
                    (false, Some(_)) => {
                        if let Some(bar) = bars.remove(&s.stream) {
                            bar.finish_and_clear();
                        }
                    }
                    (false, None) => {}
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => break,
            }
        }
        for (_, bar) in bars {
            bar.finish_and_clear();
        }
    }))
}
