//! Drawing the [`Model`]: a header, the workers, the listeners, the events and a status line,
//! with the help and the signal chooser as pop-ups. Nothing here reads or changes state, so a
//! frame depends only on the model, the size and the time given (tests draw on ratatui's
//! `TestBackend`).
//!
//! Nothing ever wraps: every line is cut at the width (ratatui's paragraphs without `wrap`),
//! and the worker table keeps the columns that fit, most useful first
//! ([`Column::PRIORITY`]), in their usual order.

use std::time::SystemTime;

use ecewo_cluster::WorkerStatus;
use ecewo_cluster::control::Status;
use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Row, Table, TableState};

use super::events::Level;
use super::model::{Link, Mode, Model, SIGNALS};

/// A column of the worker table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    Id,
    Pid,
    Status,
    Uptime,
    Restarts,
    Crashes,
    Memory,
    Cpu,
    Rate,
    InFlight,
    Beat,
}

/// The width the selection marker takes in front of every row.
const MARKER: &str = "> ";

impl Column {
    /// The order on screen.
    const ORDER: [Column; 11] = [
        Column::Id,
        Column::Pid,
        Column::Status,
        Column::Uptime,
        Column::Restarts,
        Column::Crashes,
        Column::Memory,
        Column::Cpu,
        Column::Rate,
        Column::InFlight,
        Column::Beat,
    ];

    /// The order in which columns are kept as the terminal narrows: who the worker is first,
    /// then what it costs and does now, then its history.
    pub(crate) const PRIORITY: [Column; 11] = [
        Column::Id,
        Column::Pid,
        Column::Status,
        Column::Cpu,
        Column::Memory,
        Column::Rate,
        Column::Beat,
        Column::Uptime,
        Column::Restarts,
        Column::Crashes,
        Column::InFlight,
    ];

    pub(crate) fn title(self) -> &'static str {
        match self {
            Column::Id => "ID",
            Column::Pid => "PID",
            Column::Status => "STATUS",
            Column::Uptime => "UPTIME",
            Column::Restarts => "RESTARTS",
            Column::Crashes => "CRASHES",
            Column::Memory => "MEMORY",
            Column::Cpu => "CPU%",
            Column::Rate => "REQ/S",
            Column::InFlight => "INFLIGHT",
            Column::Beat => "BEAT",
        }
    }

    fn width(self) -> u16 {
        match self {
            Column::Id => 4,
            // pid_max is at most 4194304.
            Column::Pid => 7,
            Column::Status => 10,
            Column::Uptime => 6,
            Column::Restarts => 8,
            Column::Crashes => 7,
            Column::Memory => 10,
            Column::Cpu => 6,
            Column::Rate => 7,
            Column::InFlight => 8,
            Column::Beat => 6,
        }
    }

    fn left_aligned(self) -> bool {
        self == Column::Status
    }
}

/// The columns that fit in `width`, in screen order.
pub(crate) fn columns_for(width: u16) -> Vec<Column> {
    let mut used = MARKER.len() as u16;
    let mut kept = Vec::new();
    for c in Column::PRIORITY {
        let need = c.width() + u16::from(!kept.is_empty());
        if used + need > width {
            break;
        }
        used += need;
        kept.push(c);
    }
    Column::ORDER.into_iter().filter(|c| kept.contains(c)).collect()
}

/// Draws the whole view as of `wall`.
pub(crate) fn draw(frame: &mut Frame, model: &Model, wall: SystemTime) {
    let area = frame.area();
    if area.width == 0 || area.height == 0 {
        return;
    }
    let workers = model.status().map_or(0, |s| s.workers.len()) as u16;
    let listeners = model.status().map_or(0, |s| s.cluster.listeners.len()) as u16;
    let header_h = if area.height >= 6 { 2 } else { 1 }.min(area.height);
    let status_h = u16::from(area.height > header_h);
    let mut rest = area.height - header_h - status_h;
    let listeners_h = if listeners > 0 { listeners + 2 } else { 0 };
    // The workers first, leaving the events a few lines when the terminal has them.
    let workers_h = (workers + 2).min(rest.saturating_sub(listeners_h + 4).max(rest.min(3)));
    rest -= workers_h;
    let listeners_h = if rest >= listeners_h { listeners_h } else { 0 };
    rest -= listeners_h;
    let mut y = area.y;
    let mut take = |h: u16| {
        let r = Rect::new(area.x, y, area.width, h);
        y += h;
        r
    };
    let header = take(header_h);
    let workers_area = take(workers_h);
    let listeners_area = take(listeners_h);
    let events_area = take(rest);
    let status_area = take(status_h);

    frame.render_widget(Paragraph::new(header_lines(model, wall)), header);
    if workers_area.height > 0 {
        draw_workers(frame, model, workers_area);
    }
    if listeners_area.height > 0
        && let Some(status) = model.status()
    {
        draw_listeners(frame, status, listeners_area);
    }
    if events_area.height > 0 {
        draw_events(frame, model, wall, events_area);
    }
    if status_area.height > 0 {
        frame.render_widget(Paragraph::new(status_line(model, wall)), status_area);
    }
    match model.mode() {
        Mode::Help => draw_help(frame, area),
        Mode::ChooseSignal { slot, pid, index, typed } => draw_chooser(frame, area, *slot, *pid, *index, typed),
        _ => {}
    }
}

fn age(wall: SystemTime, then: SystemTime) -> String {
    crate::duration(wall.duration_since(then).unwrap_or_default().as_secs_f64())
}

fn header_lines(model: &Model, wall: SystemTime) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let Some(s) = model.status() else {
        return vec![Line::from(format!("{}: waiting for the master's first answer…", model.cluster()))];
    };
    let (m, c) = (&s.master, &s.cluster);
    let mut first = vec![Span::styled(model.cluster().to_owned(), bold)];
    match model.link() {
        Link::Up => {
            first.push(Span::raw(format!("  master pid {}", m.pid)));
            if c.generation > 0 {
                first.push(Span::raw(format!("  generation {}", c.generation)));
            }
            if let Some(started) = m.started {
                first.push(Span::raw(format!("  up {}", age(wall, started))));
            }
            first.push(Span::raw(format!("  {}  memory {}", m.address, crate::bytes(m.rss_bytes))));
        }
        Link::Down { since, error } => {
            first.push(Span::styled(
                format!("  reconnecting… no answer for {}: {error}", age(wall, *since)),
                Style::new().fg(Color::Black).bg(Color::Yellow),
            ));
        }
    }
    let mut second = vec![Span::raw(format!(
        "workers {}/{} active  restarts {}",
        c.active_workers, c.total_workers, c.total_restarts
    ))];
    if c.crashed_workers > 0 || c.disabled_workers > 0 {
        second.push(Span::styled(
            format!("  crashed {}  disabled {}", c.crashed_workers, c.disabled_workers),
            Style::new().fg(Color::Red),
        ));
    }
    let busy = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
    if c.shutdown_requested {
        second.push(Span::styled("  shutting down", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)));
    }
    if c.restart_requested {
        second.push(Span::styled("  rolling restart in progress", busy));
    } else if let Some(last) = &c.last_restart {
        second.push(Span::raw(format!("  last restart {last}")));
    }
    if c.upgrade_requested {
        second.push(Span::styled("  master upgrade in progress", busy));
    } else if let Some(last) = &c.last_upgrade {
        second.push(Span::raw(format!("  last upgrade {last}")));
    }
    if let Some(limit) = c.memory_limit_bytes {
        second.push(Span::raw(format!(
            "  cgroup {} of {}",
            crate::bytes(c.memory_current_bytes),
            crate::bytes(Some(limit))
        )));
    }
    vec![Line::from(first), Line::from(second)]
}

fn section(title: String) -> Block<'static> {
    Block::new().borders(Borders::TOP).title(Span::styled(title, Style::new().add_modifier(Modifier::BOLD)))
}

fn cell_text(column: Column, w: &ecewo_cluster::WorkerStats, model: &Model) -> String {
    let dash = || "-".to_owned();
    let sample = w.pid.and_then(|p| model.sample(p));
    match column {
        Column::Id => w.worker_id.to_string(),
        Column::Pid => w.pid.map_or_else(dash, |p| p.to_string()),
        Column::Status => w.status.to_string(),
        Column::Uptime => {
            if w.pid.is_some() {
                crate::duration(w.uptime.as_secs_f64())
            } else {
                dash()
            }
        }
        Column::Restarts => w.restarts.to_string(),
        Column::Crashes => w.crash_count.to_string(),
        Column::Memory => crate::bytes(w.rss_bytes),
        Column::Cpu => sample.and_then(|s| s.cpu_percent).map_or_else(dash, |p| format!("{p:.1}")),
        Column::Rate => sample
            .and_then(|s| s.requests_per_sec)
            .map_or_else(dash, |r| if r >= 100.0 { format!("{r:.0}") } else { format!("{r:.1}") }),
        Column::InFlight => w.in_flight.map_or_else(dash, |n| n.to_string()),
        Column::Beat => w.heartbeat_age.map_or_else(dash, |t| format!("{:.1}s", t.as_secs_f64())),
    }
}

fn aligned(column: Column, text: String) -> String {
    let w = column.width() as usize;
    if column.left_aligned() { format!("{text:<w$}") } else { format!("{text:>w$}") }
}

fn status_style(status: WorkerStatus) -> Style {
    match status {
        WorkerStatus::Active => Style::new().fg(Color::Green),
        WorkerStatus::Starting | WorkerStatus::Stopping | WorkerStatus::Respawning => Style::new().fg(Color::Yellow),
        WorkerStatus::Crashed | WorkerStatus::Disabled => Style::new().fg(Color::Red),
        _ => Style::new().fg(Color::DarkGray),
    }
}

fn draw_workers(frame: &mut Frame, model: &Model, area: Rect) {
    let columns = columns_for(area.width);
    let Some(status) = model.status() else { return };
    let header = Row::new(columns.iter().map(|&c| aligned(c, c.title().to_owned())))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let rows = status
        .workers
        .iter()
        .map(|w| Row::new(columns.iter().map(|&c| aligned(c, cell_text(c, w, model)))).style(status_style(w.status)));
    let stale = matches!(model.link(), Link::Down { .. });
    let title = format!(" workers{} ", if stale { " (last answer)" } else { "" });
    let table = Table::new(rows, columns.iter().map(|c| Constraint::Length(c.width())))
        .header(header)
        .block(section(title))
        .column_spacing(1)
        .highlight_symbol(MARKER)
        .highlight_spacing(ratatui::widgets::HighlightSpacing::Always)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(model.selected_row());
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_listeners(frame: &mut Frame, status: &Status, area: Rect) {
    let mut lines = vec![Line::styled(
        format!("{:<16} {:<8} {:>7} {:>7}  ADDRESS", "LISTENER", "KIND", "QUEUED", "SOCKETS"),
        Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
    )];
    for l in &status.cluster.listeners {
        let queued = l.queued.map_or_else(|| "-".to_owned(), |q| q.to_string());
        let style = if l.queued.unwrap_or(0) > 0 { Style::new().fg(Color::Yellow) } else { Style::new() };
        lines.push(Line::styled(
            format!("{:<16} {:<8} {:>7} {:>7}  {}", l.name, l.kind, queued, l.sockets, l.address),
            style,
        ));
    }
    frame.render_widget(Paragraph::new(lines).block(section(" listeners ".into())), area);
}

fn draw_events(frame: &mut Frame, model: &Model, wall: SystemTime, area: Rect) {
    let room = area.height.saturating_sub(1) as usize;
    let lines: Vec<Line> = model
        .events()
        .rev()
        .take(room)
        .map(|e| {
            let style = match e.level {
                Level::Warn => Style::new().fg(Color::Yellow),
                Level::Info => Style::new(),
            };
            Line::from(vec![
                Span::styled(format!("{:>4} ago  ", age(wall, e.at)), Style::new().fg(Color::DarkGray)),
                Span::styled(e.text.clone(), style),
            ])
        })
        .collect();
    let lines =
        if lines.is_empty() { vec![Line::styled("nothing yet", Style::new().fg(Color::DarkGray))] } else { lines };
    frame.render_widget(Paragraph::new(lines).block(section(format!(" {} ", model.events_title()))), area);
}

fn status_line(model: &Model, wall: SystemTime) -> Line<'static> {
    let prompt = Style::new().fg(Color::Black).bg(Color::Yellow).add_modifier(Modifier::BOLD);
    match model.mode() {
        Mode::ConfirmRestart => {
            let n = model.status().map_or(0, |s| s.cluster.total_workers);
            return Line::styled(format!("Restart all {n} workers, one at a time? y: yes, any other key: no"), prompt);
        }
        Mode::ChooseSignal { slot, pid, .. } => {
            return Line::styled(
                format!("signal worker {slot} (pid {pid}): ↑/↓ or type a name, Enter sends, Esc cancels"),
                prompt,
            );
        }
        _ => {}
    }
    match model.message(wall) {
        Some(m) if m.error => Line::styled(m.text.clone(), Style::new().fg(Color::White).bg(Color::Red)),
        Some(m) => Line::styled(m.text.clone(), Style::new().fg(Color::Green)),
        None => Line::styled(
            "q quit  ? help  ↑/↓ select  r restart  +/- scale  s signal worker",
            Style::new().fg(Color::DarkGray),
        ),
    }
}

/// A box of `width` × `height` in the middle of `area`, no larger than it.
fn popup(area: Rect, width: u16, height: u16) -> Rect {
    let (w, h) = (width.min(area.width), height.min(area.height));
    Rect::new(area.x + (area.width - w) / 2, area.y + (area.height - h) / 2, w, h)
}

const HELP: [(&str, &str); 8] = [
    ("↑/↓, k/j", "select a worker"),
    ("r", "rolling restart of every worker (y confirms)"),
    ("+ / -", "one worker more / fewer"),
    ("s", "send a signal to the selected worker"),
    ("q, Esc, Ctrl-C", "quit"),
    ("?", "this help (any key closes it)"),
    ("CPU%", "of one core, since the last poll"),
    ("REQ/S", "between the last two heartbeats"),
];

fn draw_help(frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<15}"), Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(*what),
            ])
        })
        .collect();
    let rect = popup(area, 64, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" keys ")), rect);
}

fn draw_chooser(frame: &mut Frame, area: Rect, slot: usize, pid: u32, index: usize, typed: &str) {
    let what = |s: ecewo_cluster::Signal| match s {
        ecewo_cluster::Signal::TERM => "stop gracefully: drain, then exit",
        ecewo_cluster::Signal::KILL => "kill at once (counts as a crash)",
        ecewo_cluster::Signal::INT => "interrupt",
        ecewo_cluster::Signal::HUP => "hang up",
        _ => "the program's own meaning",
    };
    let mut lines: Vec<Line> = SIGNALS
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let name = s.name().unwrap_or_default().trim_start_matches("SIG");
            let style = if i == index && typed.is_empty() {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            Line::styled(format!(" {name:<5} {}", what(s)), style)
        })
        .collect();
    lines.push(Line::raw(format!(" or type: {typed}_")));
    let rect = popup(area, 46, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!(" signal worker {slot} (pid {pid}) "))),
        rect,
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::top::model::Update;
    use crate::top::model::tests::{status, worker};

    fn model() -> Model {
        let mut m = Model::new("demo-3000".into(), "changes seen between polls");
        let workers = (0..3).map(|i| worker(i, Some(40_000 + i as u32))).collect();
        m.apply(Update::Status {
            status: Box::new(status(4242, workers)),
            at: Instant::now(),
            wall: SystemTime::UNIX_EPOCH,
            events: Vec::new(),
        });
        m
    }

    fn screen(m: &Model, width: u16, height: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
        t.draw(|f| draw(f, m, SystemTime::UNIX_EPOCH + Duration::from_secs(100))).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect::<String>().trim_end().to_owned())
            .collect()
    }

    #[test]
    fn narrow_terminals_drop_columns_from_the_least_useful() {
        assert_eq!(columns_for(200), Column::ORDER, "everything fits");
        assert_eq!(columns_for(40), [Column::Id, Column::Pid, Column::Status, Column::Cpu]);
        assert_eq!(columns_for(50), [Column::Id, Column::Pid, Column::Status, Column::Memory, Column::Cpu]);
        assert_eq!(columns_for(10), [Column::Id], "the id is the last to go");
        assert!(columns_for(0).is_empty());
    }

    #[test]
    fn a_narrow_screen_keeps_whole_rows_with_their_pids() {
        let m = model();
        let wide = screen(&m, 120, 30);
        let head = wide.iter().find(|l| l.contains("PID")).expect("a header row");
        for c in Column::ORDER {
            assert!(head.contains(c.title()), "{c:?} in {head:?}");
        }
        for width in [60, 40, 30] {
            let lines = screen(&m, width, 20);
            let head = lines.iter().find(|l| l.contains("PID")).unwrap_or_else(|| panic!("{width}: {lines:#?}"));
            assert!(head.contains("STATUS"), "{head}");
            assert!(!head.contains("INFLIGHT"), "{width}: {head}");
            for i in 0..3u32 {
                let pid = (40_000 + i).to_string();
                let row = lines.iter().find(|l| l.contains(&pid)).unwrap_or_else(|| panic!("{pid}: {lines:#?}"));
                assert!(row.contains("active"), "{width}: the row of {pid} is whole: {row:?}");
            }
            assert!(lines.iter().all(|l| l.chars().count() <= width as usize));
        }
        let selected = wide.iter().find(|l| l.starts_with(MARKER)).expect("a selected row");
        assert!(selected.contains("40000"), "{selected}");
    }

    #[test]
    fn tiny_terminals_do_not_panic() {
        let m = model();
        for (w, h) in [(1, 1), (5, 2), (80, 3), (3, 40), (200, 1)] {
            screen(&m, w, h);
        }
        screen(&Model::new("demo-3000".into(), "x"), 10, 3);
    }

    #[test]
    fn reconnecting_says_so_and_keeps_the_last_answer() {
        let mut m = model();
        m.apply(Update::Unreachable {
            error: "no cluster is running".into(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(97),
        });
        let lines = screen(&m, 120, 30);
        assert!(lines[0].contains("reconnecting… no answer for 3s: no cluster is running"), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("40001")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("the control socket stopped answering")), "{lines:#?}");
    }
}
