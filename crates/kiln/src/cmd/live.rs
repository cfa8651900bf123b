//! The live view of `kiln build` on a terminal: a status block at the bottom of the
//! screen, redrawn in place, with each running build (its elapsed time and its last log
//! line) and the counts done / running / queued / failed and the bytes fetched. Builders'
//! output (unless `-Q`) and messages scroll above it, a line at a time, prefixed with the
//! derivation's name.
//!
//! Plain ANSI sequences (cursor up, erase line) on standard error; nothing is drawn when
//! standard error is not a terminal (the caller then prints plain lines).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_build::Event;

/// Running builds shown at most; the rest are counted on one line.
const MAX_SHOWN: usize = 8;

struct Running {
    since: Instant,
    last_line: String,
    /// The part of the builder's output after its last newline.
    partial: Vec<u8>,
    machine: String,
}

#[derive(Default)]
struct State {
    running: BTreeMap<String, Running>,
    queued: std::collections::BTreeSet<String>,
    built: usize,
    failed: usize,
    substituting: BTreeMap<String, Instant>,
    substituted: usize,
    /// Announced sizes of queued substitutions; counted as fetched once they succeed.
    sizes: BTreeMap<String, u64>,
    fetched: u64,
    /// Lines of the status block now on the screen.
    drawn: usize,
    done: bool,
}

/// See the module's documentation.
pub struct LiveView {
    state: Mutex<State>,
    quiet: bool,
    started: Instant,
}

use kiln_build::timeline::short;

fn width() -> usize {
    rustix::termios::tcgetwinsize(std::io::stderr())
        .ok()
        .map(|w| w.ws_col as usize)
        .filter(|w| *w > 10)
        .unwrap_or(80)
}

/// `s` cut to `w` characters (the status block must not wrap, or erasing it would miss
/// lines).
fn fit(s: &str, w: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= w {
        clean
    } else {
        let mut t: String = clean.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

impl LiveView {
    /// A live view if standard error is a terminal; it redraws itself every 200 ms until
    /// [`LiveView::finish`].
    pub fn start(quiet: bool) -> Option<Arc<LiveView>> {
        if !rustix::termios::isatty(std::io::stderr())
            || std::env::var_os("TERM").is_some_and(|t| t == "dumb")
        {
            return None;
        }
        let v = Arc::new(LiveView {
            state: Mutex::new(State::default()),
            quiet,
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&v);
        let _ = std::thread::Builder::new()
            .name("kiln-live-view".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let Some(v) = weak.upgrade() else { return };
                let mut s = v.lock();
                if s.done {
                    return;
                }
                v.redraw(&mut s, &[]);
            });
        Some(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Erases the status block, prints `above` (whole lines), draws the block again.
    fn redraw(&self, s: &mut State, above: &[String]) {
        let w = width();
        let mut out = String::new();
        for _ in 0..s.drawn {
            out.push_str("\x1b[1A\x1b[2K");
        }
        out.push_str("\r\x1b[2K");
        for l in above {
            out.push_str(l);
            out.push('\n');
        }
        let mut lines = Vec::new();
        if !s.done {
            for (drv, r) in s.running.iter().take(MAX_SHOWN) {
                let on = if r.machine.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", r.machine)
                };
                lines.push(fit(
                    &format!(
                        "  building {}{on} ({:.0}s): {}",
                        short(drv),
                        r.since.elapsed().as_secs_f64(),
                        r.last_line
                    ),
                    w,
                ));
            }
            if s.running.len() > MAX_SHOWN {
                lines.push(format!("  … and {} more", s.running.len() - MAX_SHOWN));
            }
            for (p, since) in s.substituting.iter().take(MAX_SHOWN) {
                lines.push(fit(
                    &format!(
                        "  fetching {} ({:.0}s)",
                        short(p),
                        since.elapsed().as_secs_f64()
                    ),
                    w,
                ));
            }
        }
        lines.push(fit(&self.summary(s), w));
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        s.drawn = lines.len();
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(out.as_bytes());
        let _ = e.flush();
    }

    fn summary(&self, s: &State) -> String {
        let mut parts = vec![
            format!("{} built", s.built),
            format!("{} running", s.running.len()),
            format!("{} queued", s.queued.len()),
            format!("{} failed", s.failed),
        ];
        if s.substituted > 0 || !s.substituting.is_empty() {
            parts.push(format!("{} fetched ({})", s.substituted, human(s.fetched)));
        }
        format!(
            "[{}] {:.0}s",
            parts.join(", "),
            self.started.elapsed().as_secs_f64()
        )
    }

    /// Takes an event.
    pub fn event(&self, e: &Event) {
        let mut s = self.lock();
        let mut above = Vec::new();
        match e {
            Event::BuildQueued { drv } => {
                s.queued.insert(drv.clone());
            }
            Event::BuildStarted {
                drv,
                machine,
                round,
                rounds,
                ..
            } => {
                s.queued.remove(drv);
                if *rounds > 1 {
                    above.push(format!("building '{drv}' (round {round}/{rounds})..."));
                }
                s.running.insert(
                    drv.clone(),
                    Running {
                        since: Instant::now(),
                        last_line: String::new(),
                        partial: Vec::new(),
                        machine: machine.clone(),
                    },
                );
            }
            Event::BuildLog { drv, data, .. } => {
                let name = short(drv).to_string();
                if let Some(r) = s.running.get_mut(drv) {
                    r.partial.extend_from_slice(data);
                    while let Some(i) = r.partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = r.partial.drain(..=i).collect();
                        let text = String::from_utf8_lossy(&line[..i]).trim_end().to_string();
                        if !text.is_empty() {
                            r.last_line = text.clone();
                        }
                        if !self.quiet {
                            above.push(format!("{name}> {text}"));
                        }
                    }
                    // A long line without a newline yet is shown as it is.
                    if r.partial.len() > 4096 {
                        let text = String::from_utf8_lossy(&r.partial).into_owned();
                        r.partial.clear();
                        if !self.quiet {
                            above.push(format!("{name}> {text}"));
                        }
                        r.last_line = text;
                    }
                }
            }
            Event::BuildFinished { drv, result } => {
                s.queued.remove(drv);
                let was_running = s.running.remove(drv);
                // The builder's last line, if it ended without a newline.
                if let Some(r) = &was_running {
                    if !r.partial.is_empty() && !self.quiet {
                        above.push(format!(
                            "{}> {}",
                            short(drv),
                            String::from_utf8_lossy(&r.partial)
                        ));
                    }
                }
                if result.success() {
                    if was_running.is_some() {
                        s.built += 1;
                    }
                } else if !result.cancelled {
                    s.failed += 1;
                    above.push(format!(
                        "error: build of '{drv}' failed: {}",
                        result.error.lines().next().unwrap_or("")
                    ));
                }
            }
            Event::SubstitutionQueued { path, nar_size, .. } => {
                s.sizes.insert(path.clone(), *nar_size);
            }
            Event::SubstitutionStarted { path, .. } => {
                s.substituting.insert(path.clone(), Instant::now());
            }
            Event::SubstitutionFinished { path, ok, error } => {
                s.substituting.remove(path);
                let size = s.sizes.remove(path).unwrap_or(0);
                if *ok {
                    s.substituted += 1;
                    s.fetched += size;
                } else {
                    let e = kiln_build::event::substitution_error(path, error);
                    above.push(format!("error: {e}"));
                }
            }
            Event::Message { level, text } => {
                if *level == 0 {
                    above.push(format!("error: {text}"));
                } else {
                    above.push(text.clone());
                }
            }
            Event::HookOutput { text } => above.push(text.clone()),
            Event::HashMismatch { .. } | Event::Phase { .. } | Event::Download { .. } => {}
        }
        // Output that printed nothing waits for the next tick: a chatty builder must not
        // cost a redraw per chunk.
        if above.is_empty() && matches!(e, Event::BuildLog { .. }) {
            return;
        }
        self.redraw(&mut s, &above);
    }

    /// Draws the final counts and stops redrawing.
    pub fn finish(&self) {
        let mut s = self.lock();
        s.done = true;
        self.redraw(&mut s, &[]);
    }
}
