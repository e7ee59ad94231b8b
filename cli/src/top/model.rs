//! The state of `top`, free of the terminal and of I/O: the last answer, the samples that rates
//! are computed from, the selected worker, what the keys are in the middle of (a confirmation,
//! the signal chooser, the help), the status line and the events. Keys go in and come out as
//! [`Action`]s for the I/O side; answers come in as [`Update`]s.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use ecewo_cluster::control::Status;
use ecewo_cluster::{Signal, WorkerStats};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::events::EventLine;

/// The signals the chooser offers, in its order (any other can be typed by name or number).
pub(crate) const SIGNALS: [Signal; 6] =
    [Signal::TERM, Signal::KILL, Signal::USR1, Signal::USR2, Signal::HUP, Signal::INT];

/// How many event lines are kept.
const EVENTS_KEPT: usize = 200;

/// How long the result of an action stays in the status line.
const MESSAGE_SHOWN: Duration = Duration::from_secs(10);

/// Two request counts less apart than this are the same heartbeat read twice.
const SAME_BEAT: Duration = Duration::from_millis(200);

/// What the user asked for, for the I/O side to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// A rolling restart of every worker.
    Restart,
    /// Change the number of workers.
    Scale { workers: usize },
    /// Send `signal` to one worker, by pid, if it is still a child of `master`.
    SignalWorker { slot: usize, pid: u32, master: u32, signal: Signal },
}

/// What the I/O side reports.
#[derive(Debug)]
pub(crate) enum Update {
    /// The master answered `status` (received at `at`), and the event feed's new lines.
    Status { status: Box<Status>, at: Instant, wall: SystemTime, events: Vec<EventLine> },
    /// The control socket did not answer.
    Unreachable { error: String, wall: SystemTime },
    /// An action was carried out (`Ok`: what happened) or not (`Err`: why, one sentence).
    Done { action: Action, result: Result<String, String>, wall: SystemTime },
}

/// Whether the control socket answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Link {
    Up,
    /// Not answering since `since`; the last error.
    Down {
        since: SystemTime,
        error: String,
    },
}

/// What the keys are in the middle of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    Normal,
    Help,
    /// `r` was pressed: `y` confirms.
    ConfirmRestart,
    /// `s` was pressed for the worker in `slot` (pid `pid`): a signal from [`SIGNALS`]
    /// (`index`), or the name being typed.
    ChooseSignal {
        slot: usize,
        pid: u32,
        index: usize,
        typed: String,
    },
}

/// The status line's message: the result of the last action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) text: String,
    pub(crate) error: bool,
    pub(crate) at: SystemTime,
}

/// The rates of one worker process, from two answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// When the answer came.
    at: Instant,
    cpu_time: Option<Duration>,
    /// The request count and when the worker counted it (its heartbeat: `at` − heartbeat age).
    requests: Option<(u64, Instant)>,
    /// CPU time per wall time since the previous answer, in percent (of one core).
    pub(crate) cpu_percent: Option<f64>,
    /// Requests per second between the last two heartbeats that brought a count.
    pub(crate) requests_per_sec: Option<f64>,
}

impl Sample {
    /// The sample of `w` answered at `at`, with rates against `prev` (the same process's
    /// previous sample, if any).
    pub(crate) fn next(prev: Option<&Sample>, w: &WorkerStats, at: Instant) -> Sample {
        let requests = w.requests.map(|n| (n, w.heartbeat_age.and_then(|age| at.checked_sub(age)).unwrap_or(at)));
        let mut sample = Sample { at, cpu_time: w.cpu_time, requests, cpu_percent: None, requests_per_sec: None };
        let Some(prev) = prev else { return sample };
        let elapsed = at.saturating_duration_since(prev.at);
        if let (Some(now), Some(before)) = (w.cpu_time, prev.cpu_time)
            && !elapsed.is_zero()
            && now >= before
        {
            sample.cpu_percent = Some((now - before).as_secs_f64() / elapsed.as_secs_f64() * 100.0);
        }
        match (requests, prev.requests) {
            (Some((n, counted)), Some((n0, counted0))) => {
                let between = counted.saturating_duration_since(counted0);
                if between < SAME_BEAT {
                    // The same heartbeat again: keep the rate it gave, and measure the next one
                    // from the same beat.
                    sample.requests = prev.requests;
                    sample.requests_per_sec = prev.requests_per_sec;
                } else if n >= n0 {
                    sample.requests_per_sec = Some((n - n0) as f64 / between.as_secs_f64());
                }
            }
            _ => sample.requests_per_sec = None,
        }
        sample
    }
}

/// The whole state of the view.
#[derive(Debug)]
pub(crate) struct Model {
    /// The cluster's name, as `list` shows it (its control socket's).
    cluster: String,
    status: Option<Box<Status>>,
    /// By pid: a replaced worker's rates start again.
    samples: HashMap<u32, Sample>,
    /// The selected worker, by slot: it stays selected when its process is replaced.
    selected: Option<usize>,
    mode: Mode,
    message: Option<Message>,
    events: VecDeque<EventLine>,
    events_title: &'static str,
    link: Link,
    /// The worker count `+`/`-` count from while a scaling they asked for is under way.
    scale_base: Option<usize>,
    scales_in_flight: usize,
    quit: bool,
}

impl Model {
    /// A model of the cluster `cluster` whose event panel is titled `events_title` (what its
    /// lines are).
    pub(crate) fn new(cluster: String, events_title: &'static str) -> Model {
        Model {
            cluster,
            status: None,
            samples: HashMap::new(),
            selected: None,
            mode: Mode::Normal,
            message: None,
            events: VecDeque::new(),
            events_title,
            link: Link::Up,
            scale_base: None,
            scales_in_flight: 0,
            quit: false,
        }
    }

    pub(crate) fn cluster(&self) -> &str {
        &self.cluster
    }

    pub(crate) fn status(&self) -> Option<&Status> {
        self.status.as_deref()
    }

    /// The rates of the process `pid`, once two answers gave them.
    pub(crate) fn sample(&self, pid: u32) -> Option<&Sample> {
        self.samples.get(&pid)
    }

    /// The selected row (an index into the workers of [`status`](Model::status)).
    pub(crate) fn selected_row(&self) -> Option<usize> {
        let workers = &self.status.as_ref()?.workers;
        let slot = self.selected?;
        workers.iter().position(|w| w.worker_id == slot)
    }

    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The message to show at `wall`, if one is recent.
    pub(crate) fn message(&self, wall: SystemTime) -> Option<&Message> {
        self.message.as_ref().filter(|m| wall.duration_since(m.at).unwrap_or_default() < MESSAGE_SHOWN)
    }

    /// The events, oldest first.
    pub(crate) fn events(&self) -> impl DoubleEndedIterator<Item = &EventLine> {
        self.events.iter()
    }

    pub(crate) fn events_title(&self) -> &'static str {
        self.events_title
    }

    pub(crate) fn quit(&self) -> bool {
        self.quit
    }

    fn say(&mut self, text: impl Into<String>, error: bool, wall: SystemTime) {
        self.message = Some(Message { text: text.into(), error, at: wall });
    }

    fn push_event(&mut self, line: EventLine) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(line);
    }

    /// Takes in what the I/O side reports.
    pub(crate) fn apply(&mut self, update: Update) {
        match update {
            Update::Status { status, at, wall, events } => {
                if let Link::Down { .. } = self.link {
                    self.push_event(EventLine::info(
                        wall,
                        format!("the control socket answers again (master pid {})", status.master.pid),
                    ));
                }
                self.link = Link::Up;
                for line in events {
                    self.push_event(line);
                }
                self.samples = status
                    .workers
                    .iter()
                    .filter_map(|w| {
                        let pid = w.pid?;
                        Some((pid, Sample::next(self.samples.get(&pid), w, at)))
                    })
                    .collect();
                self.keep_selection(&status);
                if self.scales_in_flight == 0 {
                    self.scale_base = None;
                }
                // A chooser for a worker that was replaced meanwhile would signal nobody.
                if let Mode::ChooseSignal { slot, pid, .. } = self.mode
                    && !status.workers.iter().any(|w| w.worker_id == slot && w.pid == Some(pid))
                {
                    self.mode = Mode::Normal;
                    self.say(format!("worker {slot} (pid {pid}) is gone; nothing was sent"), true, wall);
                }
                self.status = Some(status);
            }
            Update::Unreachable { error, wall } => {
                self.link = match std::mem::replace(&mut self.link, Link::Up) {
                    Link::Up => {
                        self.push_event(EventLine::warn(
                            wall,
                            format!("the control socket stopped answering: {error}"),
                        ));
                        Link::Down { since: wall, error }
                    }
                    Link::Down { since, .. } => Link::Down { since, error },
                };
            }
            Update::Done { action, result, wall } => {
                if let Action::Scale { .. } = action {
                    self.scales_in_flight = self.scales_in_flight.saturating_sub(1);
                    if result.is_err() {
                        self.scale_base = None;
                    }
                }
                match result {
                    Ok(text) => self.say(text, false, wall),
                    Err(text) => self.say(text, true, wall),
                }
            }
        }
    }

    /// Keeps the selected slot; if it is gone (scaled away), the row where it was.
    fn keep_selection(&mut self, next: &Status) {
        if next.workers.is_empty() {
            self.selected = None;
            return;
        }
        if let Some(slot) = self.selected
            && next.workers.iter().any(|w| w.worker_id == slot)
        {
            return;
        }
        let row = self.selected_row().unwrap_or(0).min(next.workers.len() - 1);
        self.selected = Some(next.workers[row].worker_id);
    }

    fn move_selection(&mut self, down: bool) {
        let Some(status) = &self.status else { return };
        if status.workers.is_empty() {
            return;
        }
        let row = match (self.selected_row(), down) {
            (None, _) => 0,
            (Some(r), true) => (r + 1).min(status.workers.len() - 1),
            (Some(r), false) => r.saturating_sub(1),
        };
        self.selected = Some(status.workers[row].worker_id);
    }

    /// A key press; the action to carry out, if it asks for one. `wall` stamps messages.
    pub(crate) fn on_key(&mut self, key: KeyEvent, wall: SystemTime) -> Option<Action> {
        if key.kind != KeyEventKind::Press {
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c' | 'C')) {
            self.quit = true;
            return None;
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Help => None,
            Mode::ConfirmRestart => {
                if matches!(key.code, KeyCode::Char('y' | 'Y')) {
                    self.say("asking for a rolling restart…", false, wall);
                    Some(Action::Restart)
                } else {
                    self.say("rolling restart cancelled", false, wall);
                    None
                }
            }
            Mode::ChooseSignal { slot, pid, index, mut typed } => {
                let keep = |index, typed| Mode::ChooseSignal { slot, pid, index, typed };
                match key.code {
                    KeyCode::Esc => {
                        self.say("no signal sent", false, wall);
                        None
                    }
                    KeyCode::Up => {
                        self.mode = keep(index.saturating_sub(1), typed);
                        None
                    }
                    KeyCode::Down => {
                        self.mode = keep((index + 1).min(SIGNALS.len() - 1), typed);
                        None
                    }
                    KeyCode::Backspace => {
                        typed.pop();
                        self.mode = keep(index, typed);
                        None
                    }
                    KeyCode::Char(c) if c.is_ascii_alphanumeric() && typed.len() < 12 => {
                        typed.push(c);
                        self.mode = keep(index, typed);
                        None
                    }
                    KeyCode::Enter => {
                        let signal = if typed.is_empty() {
                            SIGNALS[index]
                        } else {
                            match typed.parse::<Signal>() {
                                Ok(s) => s,
                                Err(e) => {
                                    self.say(e.to_string(), true, wall);
                                    self.mode = keep(index, typed);
                                    return None;
                                }
                            }
                        };
                        let master = self.status.as_ref().map_or(0, |s| s.master.pid);
                        self.say(format!("sending {signal} to worker {slot} (pid {pid})…"), false, wall);
                        Some(Action::SignalWorker { slot, pid, master, signal })
                    }
                    _ => {
                        self.mode = keep(index, typed);
                        None
                    }
                }
            }
            Mode::Normal => self.on_normal_key(key, wall),
        }
    }

    fn on_normal_key(&mut self, key: KeyEvent, wall: SystemTime) -> Option<Action> {
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => self.quit = true,
            KeyCode::Char('?') | KeyCode::Char('h') | KeyCode::F(1) => self.mode = Mode::Help,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(false),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(true),
            KeyCode::Char('r') => self.mode = Mode::ConfirmRestart,
            KeyCode::Char(c @ ('+' | '-')) => {
                let Some(status) = &self.status else { return None };
                let base = self.scale_base.unwrap_or(status.cluster.total_workers);
                let workers = if c == '+' {
                    base + 1
                } else if base <= 1 {
                    self.say(
                        format!("the cluster runs {base} worker, the fewest it can (`ecewo-cluster stop` stops it)"),
                        true,
                        wall,
                    );
                    return None;
                } else {
                    base - 1
                };
                self.scale_base = Some(workers);
                self.scales_in_flight += 1;
                self.say(format!("asking to scale to {workers} workers…"), false, wall);
                return Some(Action::Scale { workers });
            }
            KeyCode::Char('s') => {
                let worker = self.selected_row().and_then(|r| self.status.as_ref().map(|s| &s.workers[r]));
                match worker {
                    Some(w) if w.pid.is_some() => {
                        let pid = w.pid.unwrap_or_default();
                        self.mode = Mode::ChooseSignal { slot: w.worker_id, pid, index: 0, typed: String::new() };
                    }
                    Some(w) => self.say(format!("worker {} runs no process to signal", w.worker_id), true, wall),
                    None => self.say("no worker is selected (↑/↓ select one)", true, wall),
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A worker of slot `id` with process `pid` (active if it has one).
    pub(crate) fn worker(id: usize, pid: Option<u32>) -> WorkerStats {
        serde_json::from_value(serde_json::json!({
            "worker_id": id, "pid": pid, "port": 3000,
            "status": if pid.is_some() { "active" } else { "respawning" },
            "start_time": null, "uptime": 5.0, "exit_status": null, "crash_count": 0,
            "respawn_disabled": false, "rss_bytes": 10_485_760, "cpu_time": 1.0,
            "heartbeat_age": 0.5, "requests": 100, "in_flight": 0
        }))
        .unwrap()
    }

    /// A master `master` with these workers, all counted active.
    pub(crate) fn status(master: u32, workers: Vec<WorkerStats>) -> Status {
        let n = workers.len();
        serde_json::from_value(serde_json::json!({
            "master": { "pid": master, "name": "demo-3000", "address": "127.0.0.1:3000",
                        "balance": "reuseport", "started": 1.0, "rss_bytes": 4_194_304 },
            "cluster": { "total_workers": n, "active_workers": n, "crashed_workers": 0,
                         "disabled_workers": 0, "shutdown_requested": false,
                         "restart_requested": false, "total_restarts": 0, "last_restart": null,
                         "listeners": [{ "name": "default", "address": "127.0.0.1:3000",
                                         "kind": "tcp", "balance": "reuseport", "sockets": n,
                                         "queued": 0 }] },
            "workers": workers,
        }))
        .unwrap()
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn update(status: Status, at: Instant) -> Update {
        Update::Status { status: Box::new(status), at, wall: SystemTime::UNIX_EPOCH, events: Vec::new() }
    }

    #[test]
    fn cpu_percent_and_requests_per_second_come_from_two_samples() {
        let t0 = Instant::now();
        let mut w = worker(0, Some(10));
        w.cpu_time = Some(Duration::from_millis(1_000));
        w.requests = Some(100);
        w.heartbeat_age = Some(Duration::from_millis(300));
        let first = Sample::next(None, &w, t0);
        assert_eq!((first.cpu_percent, first.requests_per_sec), (None, None), "one sample gives no rate");
        // Two seconds later: 0.5 s more CPU, and a beat 2.1 s after the first (age 0.2 s) with
        // 420 requests more.
        w.cpu_time = Some(Duration::from_millis(1_500));
        w.requests = Some(520);
        w.heartbeat_age = Some(Duration::from_millis(200));
        let second = Sample::next(Some(&first), &w, t0 + Duration::from_secs(2));
        assert!((second.cpu_percent.unwrap() - 25.0).abs() < 1e-9, "{second:?}");
        assert!((second.requests_per_sec.unwrap() - 200.0).abs() < 1e-9, "{second:?}");
        // The same beat read again a second later: the rate stays, measured from that beat.
        w.cpu_time = Some(Duration::from_millis(1_500));
        w.heartbeat_age = Some(Duration::from_millis(1_200));
        let third = Sample::next(Some(&second), &w, t0 + Duration::from_secs(3));
        assert_eq!(third.requests_per_sec, second.requests_per_sec);
        assert_eq!(third.cpu_percent, Some(0.0));
        // A counter that went back (another process behind the same pid) gives no rate.
        w.requests = Some(5);
        w.heartbeat_age = Some(Duration::ZERO);
        let fourth = Sample::next(Some(&third), &w, t0 + Duration::from_secs(4));
        assert_eq!(fourth.requests_per_sec, None);
    }

    #[test]
    fn a_replaced_worker_starts_its_rates_again_and_keeps_its_selection() {
        let mut m = Model::new("demo-3000".into(), "test");
        let t0 = Instant::now();
        m.apply(update(status(1, vec![worker(0, Some(10)), worker(1, Some(11)), worker(2, Some(12))]), t0));
        assert_eq!(m.selected_row(), Some(0), "the first row is selected");
        m.on_key(key(KeyCode::Down), SystemTime::UNIX_EPOCH);
        m.on_key(key(KeyCode::Char('j')), SystemTime::UNIX_EPOCH);
        m.on_key(key(KeyCode::Down), SystemTime::UNIX_EPOCH);
        assert_eq!(m.selected_row(), Some(2), "stops at the last row");
        m.on_key(key(KeyCode::Char('k')), SystemTime::UNIX_EPOCH);
        assert_eq!(m.selected_row(), Some(1));
        // Slot 1's worker is replaced (pid 11 → 21): slot 1 stays selected.
        let t1 = t0 + Duration::from_secs(1);
        m.apply(update(status(1, vec![worker(0, Some(10)), worker(1, Some(21)), worker(2, Some(12))]), t1));
        assert_eq!(m.selected_row(), Some(1));
        assert_eq!(m.status().unwrap().workers[1].pid, Some(21));
        assert!(m.sample(11).is_none(), "the old pid's samples are dropped");
        assert_eq!(m.sample(21).unwrap().cpu_percent, None, "the new process has one sample");
        assert!(m.sample(10).unwrap().cpu_percent.is_some(), "the others have two");
        // A new master (an upgrade) with the same slots: still slot 1.
        m.apply(update(status(2, vec![worker(0, Some(30)), worker(1, Some(31)), worker(2, Some(32))]), t1));
        assert_eq!(m.selected_row(), Some(1));
        // Scaled down to one worker: the selection moves to the last row left.
        m.on_key(key(KeyCode::Down), SystemTime::UNIX_EPOCH);
        m.apply(update(status(2, vec![worker(0, Some(30))]), t1));
        assert_eq!(m.selected_row(), Some(0));
    }

    #[test]
    fn restart_needs_a_confirmation() {
        let mut m = Model::new("demo-3000".into(), "test");
        m.apply(update(status(1, vec![worker(0, Some(10))]), Instant::now()));
        let wall = SystemTime::UNIX_EPOCH;
        assert_eq!(m.on_key(key(KeyCode::Char('r')), wall), None);
        assert_eq!(m.mode(), &Mode::ConfirmRestart);
        assert_eq!(m.on_key(key(KeyCode::Char('n')), wall), None);
        assert_eq!(m.mode(), &Mode::Normal);
        assert_eq!(m.message(wall).unwrap().text, "rolling restart cancelled");
        m.on_key(key(KeyCode::Char('r')), wall);
        assert_eq!(m.on_key(key(KeyCode::Char('y')), wall), Some(Action::Restart));
        m.apply(Update::Done { action: Action::Restart, result: Err("refused: a rollout runs".into()), wall });
        let msg = m.message(wall).unwrap();
        assert!(msg.error && msg.text == "refused: a rollout runs");
        assert!(m.message(wall + Duration::from_secs(11)).is_none(), "messages expire");
    }

    #[test]
    fn scaling_counts_from_the_last_request_until_the_master_shows_it() {
        let mut m = Model::new("demo-3000".into(), "test");
        let wall = SystemTime::UNIX_EPOCH;
        let t0 = Instant::now();
        m.apply(update(status(1, vec![worker(0, Some(10)), worker(1, Some(11))]), t0));
        assert_eq!(m.on_key(key(KeyCode::Char('+')), wall), Some(Action::Scale { workers: 3 }));
        // A poll answered before the request was carried out still says 2.
        m.apply(update(status(1, vec![worker(0, Some(10)), worker(1, Some(11))]), t0));
        assert_eq!(m.on_key(key(KeyCode::Char('+')), wall), Some(Action::Scale { workers: 4 }));
        for workers in [3, 4] {
            m.apply(Update::Done { action: Action::Scale { workers }, result: Ok("ok".into()), wall });
        }
        let four = (0..4).map(|i| worker(i, Some(10 + i as u32))).collect();
        m.apply(update(status(1, four), t0));
        assert_eq!(m.on_key(key(KeyCode::Char('-')), wall), Some(Action::Scale { workers: 3 }));
        m.apply(Update::Done { action: Action::Scale { workers: 3 }, result: Err("no".into()), wall });
        m.apply(update(status(1, vec![worker(0, Some(10))]), t0));
        assert_eq!(m.on_key(key(KeyCode::Char('-')), wall), None, "never below one worker");
        assert!(m.message(wall).unwrap().error);
    }

    #[test]
    fn the_signal_chooser_picks_from_the_list_or_a_typed_name() {
        let mut m = Model::new("demo-3000".into(), "test");
        let wall = SystemTime::UNIX_EPOCH;
        m.apply(update(status(7, vec![worker(0, Some(10)), worker(1, None)]), Instant::now()));
        m.on_key(key(KeyCode::Char('s')), wall);
        m.on_key(key(KeyCode::Down), wall);
        m.on_key(key(KeyCode::Down), wall);
        assert_eq!(
            m.on_key(key(KeyCode::Enter), wall),
            Some(Action::SignalWorker { slot: 0, pid: 10, master: 7, signal: Signal::USR1 })
        );
        m.on_key(key(KeyCode::Char('s')), wall);
        for c in "winch".chars() {
            m.on_key(key(KeyCode::Char(c)), wall);
        }
        assert_eq!(
            m.on_key(key(KeyCode::Enter), wall),
            Some(Action::SignalWorker { slot: 0, pid: 10, master: 7, signal: Signal::WINCH })
        );
        m.on_key(key(KeyCode::Char('s')), wall);
        m.on_key(key(KeyCode::Char('x')), wall);
        assert_eq!(m.on_key(key(KeyCode::Enter), wall), None, "an unknown name");
        assert!(m.message(wall).unwrap().text.contains("unknown signal"), "{:?}", m.message(wall));
        assert!(matches!(m.mode(), Mode::ChooseSignal { .. }), "the chooser stays open to fix it");
        m.on_key(key(KeyCode::Esc), wall);
        assert_eq!(m.mode(), &Mode::Normal);
        // A worker with no process has nothing to signal.
        m.on_key(key(KeyCode::Down), wall);
        m.on_key(key(KeyCode::Char('s')), wall);
        assert_eq!(m.mode(), &Mode::Normal);
        assert!(m.message(wall).unwrap().text.contains("runs no process"));
    }

    #[test]
    fn losing_and_finding_the_master_are_events() {
        let mut m = Model::new("demo-3000".into(), "test");
        let wall = SystemTime::UNIX_EPOCH;
        m.apply(update(status(1, vec![worker(0, Some(10))]), Instant::now()));
        m.apply(Update::Unreachable { error: "no cluster is running".into(), wall });
        m.apply(Update::Unreachable { error: "still not".into(), wall: wall + Duration::from_secs(1) });
        assert_eq!(m.link(), &Link::Down { since: wall, error: "still not".into() });
        assert!(m.status().is_some(), "the last answer stays on screen");
        m.apply(update(status(2, vec![worker(0, Some(20))]), Instant::now()));
        assert_eq!(m.link(), &Link::Up);
        let events: Vec<&str> = m.events().map(|e| e.text.as_str()).collect();
        assert_eq!(
            events,
            [
                "the control socket stopped answering: no cluster is running",
                "the control socket answers again (master pid 2)"
            ]
        );
    }

    #[test]
    fn quit_keys() {
        for k in [key(KeyCode::Char('q')), key(KeyCode::Esc), KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)]
        {
            let mut m = Model::new("demo-3000".into(), "test");
            m.on_key(k, SystemTime::UNIX_EPOCH);
            assert!(m.quit(), "{k:?}");
        }
        // Esc in the help closes the help only.
        let mut m = Model::new("demo-3000".into(), "test");
        m.on_key(key(KeyCode::Char('?')), SystemTime::UNIX_EPOCH);
        assert_eq!(m.mode(), &Mode::Help);
        m.on_key(key(KeyCode::Esc), SystemTime::UNIX_EPOCH);
        assert!(!m.quit());
        assert_eq!(m.mode(), &Mode::Normal);
    }
}
