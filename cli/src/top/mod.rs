//! `ecewo-cluster top`: a live view of one cluster in the terminal.
//!
//! - `model.rs`: the state (samples and rates, selection, confirmations, messages, events); keys
//!   in, actions out; no terminal, no I/O.
//! - `ui.rs`: draws a model into a ratatui frame.
//! - `io.rs`: the threads: the poller (every control request), the terminal's input, signals.
//! - `events.rs`: the one adapter that feeds the events panel.
//! - this file: the terminal's set-up and its restoration (also on panic and on signals), and
//!   the loop that hands messages from the threads to the model and draws.

mod events;
mod io;
mod model;
mod ui;

use std::io::{IsTerminal as _, Stdout};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::{Hide, Show};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode};

use crate::{Failure, Target};
use events::EventFeed;
use io::Msg;
use model::{Action, Model, Update};

/// `top`'s own options (the cluster is chosen with the global --pid, --name or --socket).
#[derive(clap::Args)]
pub(crate) struct TopArgs {
    /// How often to ask the master for its statistics, in milliseconds (100 to 60000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    interval_ms: u64,
}

/// Runs the view until `q` (exit 0), a signal (128 + its number), or an error (1, with one
/// sentence on stderr once the terminal is restored).
pub(crate) fn main(args: TopArgs, target: &Target, timeout: Duration) -> ExitCode {
    match run(args, target, timeout) {
        Ok(code) => code,
        Err(Failure(msg)) => {
            eprintln!("ecewo-cluster: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: TopArgs, target: &Target, timeout: Duration) -> Result<ExitCode, Failure> {
    if !std::io::stdout().is_terminal() {
        return Err(Failure(
            "top draws a live view and needs a terminal, but its output is not one; use `ecewo-cluster status` (or `status --json`) for a snapshot".into(),
        ));
    }
    // Found and asked once before the screen changes, so that a wrong name or a cluster that is
    // not running is an ordinary error. Later, the same socket is asked again and again: a new
    // master (restarted, or upgraded in place) answers there too.
    let socket = crate::find(target, timeout)?;
    let first = io::status(&socket, timeout).map_err(Failure)?;
    let mut feed = EventFeed::default();
    let name = socket.file_name().map(|n| n.to_string_lossy().trim_end_matches(".sock").to_owned());
    let wall = SystemTime::now();
    let events = feed.next(&socket, timeout, &first, wall);
    let mut model = Model::new(name.unwrap_or_else(|| socket.display().to_string()), feed.title());
    model.apply(Update::Status { status: first, at: Instant::now(), wall, events });

    let (tx, rx) = mpsc::channel();
    io::spawn_signals(tx.clone()).map_err(|e| Failure(format!("cannot handle signals: {e}")))?;
    let mut screen = Screen::enter()?;
    io::spawn_input(tx.clone());
    let actions = io::spawn_poller(socket, timeout, Duration::from_millis(args.interval_ms), feed, tx);
    let outcome = run_loop(&mut screen.terminal, &mut model, &rx, &actions);
    drop(screen);
    outcome
}

/// Hands every message to the model and draws after each batch.
fn run_loop(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    model: &mut Model,
    rx: &Receiver<Msg>,
    actions: &Sender<Action>,
) -> Result<ExitCode, Failure> {
    let draw = |terminal: &mut Terminal<CrosstermBackend<Stdout>>, model: &Model| {
        terminal
            .draw(|frame| ui::draw(frame, model, SystemTime::now()))
            .map(drop)
            .map_err(|e| Failure(format!("cannot draw on the terminal: {e}")))
    };
    draw(terminal, model)?;
    loop {
        let mut next = rx.recv().ok();
        if next.is_none() {
            return Err(Failure("the view's threads ended unexpectedly".into()));
        }
        // Everything waiting, then one frame (a resize sends many events).
        while let Some(msg) = next {
            match msg {
                Msg::Key(key) => {
                    if let Some(action) = model.on_key(key, SystemTime::now())
                        && actions.send(action).is_err()
                    {
                        return Err(Failure("the view's poller ended unexpectedly".into()));
                    }
                }
                Msg::Redraw => {}
                Msg::Update(update) => model.apply(update),
                Msg::Signal(signal) => return Ok(ExitCode::from(128u8.saturating_add(signal as u8))),
                Msg::InputFailed(error) => return Err(Failure(error)),
            }
            if model.quit() {
                return Ok(ExitCode::SUCCESS);
            }
            next = rx.try_recv().ok();
        }
        draw(terminal, model)?;
    }
}

/// The terminal in raw mode on the alternate screen; dropping it restores the terminal.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> Result<Screen, Failure> {
        install_panic_hook();
        let setup = || -> std::io::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode()?;
            execute!(std::io::stdout(), EnterAlternateScreen, Hide)?;
            Terminal::new(CrosstermBackend::new(std::io::stdout()))
        };
        setup().map(|terminal| Screen { terminal }).map_err(|e| {
            restore();
            Failure(format!("cannot set up the terminal: {e}"))
        })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Raw mode off, the alternate screen left, the cursor shown: safe to call more than once,
/// errors ignored (the terminal may be gone).
fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, Show);
}

/// A panic anywhere (a thread too) restores the terminal first, so that its message is readable
/// and the shell usable, and then ends the process: the view cannot go on half-drawn.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
        std::process::exit(101);
    }));
}
