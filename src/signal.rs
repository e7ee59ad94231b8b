//! [`Signal`]: a Unix signal, named without `libc`.

use std::fmt;
use std::str::FromStr;

/// A Unix signal: one of the named ones ([`Signal::USR1`], [`Signal::HUP`], …) or a real-time
/// signal number. Used to signal workers, to bind master actions ([`crate::Cluster::on_signal`])
/// and to say how a worker died ([`crate::ExitStatus::Signal`]).
///
/// ```
/// use ecewo_cluster::Signal;
///
/// assert_eq!("usr1".parse::<Signal>(), Ok(Signal::USR1));
/// assert_eq!("SIGHUP".parse::<Signal>(), Ok(Signal::HUP));
/// assert_eq!(Signal::TERM.to_string(), "SIGTERM");
/// assert_eq!(Signal::from_raw(10), Some(Signal::USR1));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

macro_rules! named {
    ($($(#[$doc:meta])* $name:ident = $libc:ident, $text:literal;)*) => {
        impl Signal {
            $($(#[$doc])* pub const $name: Signal = Signal(libc::$libc);)*
        }
        /// Every named signal, with its conventional name.
        const NAMED: &[(Signal, &str)] = &[$((Signal::$name, $text)),*];
    };
}

named! {
    /// `SIGHUP`: the terminal hung up (a graceful shutdown of the master by default).
    HUP = SIGHUP, "SIGHUP";
    /// `SIGINT`: Ctrl-C (a graceful shutdown of the master).
    INT = SIGINT, "SIGINT";
    /// `SIGQUIT`: Ctrl-\ (a graceful shutdown of the master by default).
    QUIT = SIGQUIT, "SIGQUIT";
    /// `SIGILL`: an illegal instruction.
    ILL = SIGILL, "SIGILL";
    /// `SIGTRAP`: a breakpoint trap.
    TRAP = SIGTRAP, "SIGTRAP";
    /// `SIGABRT`: `abort()`.
    ABRT = SIGABRT, "SIGABRT";
    /// `SIGBUS`: a bus error.
    BUS = SIGBUS, "SIGBUS";
    /// `SIGFPE`: an arithmetic fault.
    FPE = SIGFPE, "SIGFPE";
    /// `SIGKILL`: cannot be caught.
    KILL = SIGKILL, "SIGKILL";
    /// `SIGUSR1`: free for the program.
    USR1 = SIGUSR1, "SIGUSR1";
    /// `SIGSEGV`: a segmentation fault.
    SEGV = SIGSEGV, "SIGSEGV";
    /// `SIGUSR2`: a rolling restart of the master by default.
    USR2 = SIGUSR2, "SIGUSR2";
    /// `SIGPIPE`: a write to a closed pipe.
    PIPE = SIGPIPE, "SIGPIPE";
    /// `SIGALRM`: a timer.
    ALRM = SIGALRM, "SIGALRM";
    /// `SIGTERM`: a graceful shutdown.
    TERM = SIGTERM, "SIGTERM";
    /// `SIGSTKFLT`: a stack fault (unused on Linux).
    STKFLT = SIGSTKFLT, "SIGSTKFLT";
    /// `SIGCHLD`: a child changed state.
    CHLD = SIGCHLD, "SIGCHLD";
    /// `SIGCONT`: continue a stopped process.
    CONT = SIGCONT, "SIGCONT";
    /// `SIGSTOP`: cannot be caught.
    STOP = SIGSTOP, "SIGSTOP";
    /// `SIGTSTP`: Ctrl-Z.
    TSTP = SIGTSTP, "SIGTSTP";
    /// `SIGTTIN`: one worker more, in the master by default.
    TTIN = SIGTTIN, "SIGTTIN";
    /// `SIGTTOU`: one worker fewer, in the master by default.
    TTOU = SIGTTOU, "SIGTTOU";
    /// `SIGURG`: urgent data on a socket.
    URG = SIGURG, "SIGURG";
    /// `SIGXCPU`: the CPU-time limit was reached.
    XCPU = SIGXCPU, "SIGXCPU";
    /// `SIGXFSZ`: the file-size limit was reached.
    XFSZ = SIGXFSZ, "SIGXFSZ";
    /// `SIGVTALRM`: a virtual timer.
    VTALRM = SIGVTALRM, "SIGVTALRM";
    /// `SIGPROF`: a profiling timer.
    PROF = SIGPROF, "SIGPROF";
    /// `SIGWINCH`: the terminal was resized.
    WINCH = SIGWINCH, "SIGWINCH";
    /// `SIGIO`: I/O is possible.
    IO = SIGIO, "SIGIO";
    /// `SIGPWR`: a power failure.
    PWR = SIGPWR, "SIGPWR";
    /// `SIGSYS`: a bad system call.
    SYS = SIGSYS, "SIGSYS";
}

/// The highest signal number Linux has (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;

impl Signal {
    /// The signal with this number: a named one, or a real-time signal (from the C library's
    /// `SIGRTMIN`, 34 with glibc and 35 with musl, to 64). `None` for anything else (0, negative
    /// numbers, numbers past 64, and those the C library keeps for itself).
    pub fn from_raw(number: i32) -> Option<Signal> {
        if NAMED.iter().any(|(s, _)| s.0 == number) || (libc::SIGRTMIN()..=MAX_SIGNAL).contains(&number) {
            Some(Signal(number))
        } else {
            None
        }
    }

    /// The signal number (`10` for `SIGUSR1` on Linux).
    pub fn as_raw(self) -> i32 {
        self.0
    }

    /// The conventional name (`"SIGUSR1"`), or `None` for a real-time signal.
    pub fn name(self) -> Option<&'static str> {
        NAMED.iter().find(|(s, _)| *s == self).map(|(_, n)| *n)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "Signal::{}", &name[3..]),
            None => write!(f, "Signal({})", self.0),
        }
    }
}

/// The error of parsing a [`Signal`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown signal {0:?}; use a name like USR1, SIGHUP or TERM, or a number")]
pub struct UnknownSignal(pub String);

impl FromStr for Signal {
    type Err = UnknownSignal;

    /// `USR1`, `SIGUSR1`, `usr1` or a number (`10`).
    fn from_str(text: &str) -> Result<Signal, UnknownSignal> {
        let trimmed = text.trim();
        if let Ok(n) = trimmed.parse::<i32>() {
            return Signal::from_raw(n).ok_or_else(|| UnknownSignal(text.to_owned()));
        }
        let upper = trimmed.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
        NAMED.iter().find(|(_, n)| *n == full).map(|(s, _)| *s).ok_or_else(|| UnknownSignal(text.to_owned()))
    }
}

impl TryFrom<i32> for Signal {
    type Error = crate::Error;

    /// A signal number from `libc`; [`Error::InvalidSignal`](crate::Error::InvalidSignal) if it
    /// is not one.
    fn try_from(number: i32) -> Result<Signal, crate::Error> {
        Signal::from_raw(number).ok_or(crate::Error::InvalidSignal(number))
    }
}

impl serde::Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Signal {
    /// A number, or a name as [`FromStr`] takes it.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i32),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => {
                Signal::from_raw(n).ok_or_else(|| serde::de::Error::custom(format!("unknown signal {n}")))
            }
            Raw::Name(name) => name.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(Signal::from_raw(libc::SIGKILL), Some(Signal::KILL));
        assert_eq!(Signal::KILL.as_raw(), 9);
        assert_eq!(Signal::from_raw(0), None);
        assert_eq!(Signal::from_raw(32), None);
        assert_eq!(Signal::from_raw(65), None);
        assert_eq!(Signal::from_raw(40).map(|s| s.to_string()), Some("signal 40".into()));
        assert_eq!("term".parse(), Ok(Signal::TERM));
        assert_eq!(" SIGWINCH ".parse(), Ok(Signal::WINCH));
        assert_eq!("15".parse(), Ok(Signal::TERM));
        assert!("NOPE".parse::<Signal>().is_err());
        assert!("999".parse::<Signal>().is_err());
        assert_eq!(format!("{:?}", Signal::USR1), "Signal::USR1");
        assert_eq!(Signal::try_from(libc::SIGHUP).unwrap(), Signal::HUP);
        assert!(Signal::try_from(0).is_err());
        assert_eq!(serde_json::to_string(&Signal::USR2).unwrap(), "12");
        assert_eq!(serde_json::from_str::<Signal>("\"usr1\"").unwrap(), Signal::USR1);
        assert_eq!(serde_json::from_str::<Signal>("1").unwrap(), Signal::HUP);
        assert!(serde_json::from_str::<Signal>("0").is_err());
    }
}
