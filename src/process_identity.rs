//! Process identity: a pid together with the process's start time, so that a
//! recycled pid is never mistaken for the process that used to own it.
//!
//! The start time is field 22 (`starttime`, clock ticks since boot) of
//! `/proc/<pid>/stat`. Two processes that share a pid at different moments
//! differ in their start time unless the pid is recycled within one clock tick
//! (10 ms at the usual `USER_HZ` of 100), which pid allocation makes practically
//! impossible.

use std::fmt;
use std::io;

/// A process named by (pid, start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks from boot to the process's start.
    pub start_time: u64,
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// Field 3: the one-letter state (`R`, `S`, `D`, `Z`, `X`, ...).
    pub state: char,
    /// Field 4: the parent's pid (0 for a process whose parent is outside its pid namespace).
    pub ppid: i32,
    /// Field 5: the process group id.
    pub pgrp: i32,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

impl StatFields {
    /// A zombie (`Z`) or dead (`X`, `x`) process has finished: it holds no locks
    /// and runs no code, only its exit status waits to be reaped.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// A process stopped by a signal (`T`: SIGSTOP, Ctrl-Z) or a tracer (`t`) holds its
    /// locks but runs no code: it answers nothing until it is continued.
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Why a `/proc/<pid>/stat` line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatParseError {
    /// The line has no `)` closing the command name.
    #[error("no ')' closing the command name")]
    NoCommandEnd,
    /// The line ends before the field.
    #[error("the line ends before field {0}")]
    MissingField(usize),
    /// The field is not what it must be.
    #[error("field {field} is {value:?}, which is not valid")]
    BadField {
        /// The field number, counted from 1 as in proc(5).
        field: usize,
        /// The text found.
        value: String,
    },
}

/// Parse the text of `/proc/<pid>/stat`.
///
/// Field 2 is the command name in parentheses; it may itself hold spaces and
/// parentheses (a process can name itself `a) b (c`), so the fields after it
/// are found after the *last* `)` of the line.
pub fn parse_stat(line: &str) -> Result<StatFields, StatParseError> {
    let end = line.rfind(')').ok_or(StatParseError::NoCommandEnd)?;
    // Fields 3, 4, ... follow the command name, separated by single spaces.
    let mut rest = line[end + 1..].split_ascii_whitespace();
    let state_text = rest.next().ok_or(StatParseError::MissingField(3))?;
    let mut chars = state_text.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => c,
        _ => {
            return Err(StatParseError::BadField {
                field: 3,
                value: state_text.to_owned(),
            });
        }
    };
    // Fields 4 and 5: the parent and the process group.
    let mut number = |field: usize| -> Result<i32, StatParseError> {
        let text = rest.next().ok_or(StatParseError::MissingField(field))?;
        text.parse::<i32>().map_err(|_| StatParseError::BadField {
            field,
            value: text.to_owned(),
        })
    };
    let ppid = number(4)?;
    let pgrp = number(5)?;
    // `rest` is now positioned at field 6; field 22 is 16 further on.
    let start_text = rest.nth(22 - 6).ok_or(StatParseError::MissingField(22))?;
    let start_time = start_text
        .parse::<u64>()
        .map_err(|_| StatParseError::BadField {
            field: 22,
            value: start_text.to_owned(),
        })?;
    Ok(StatFields {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

/// Read and parse `/proc/<pid>/stat`.
pub fn read_stat(pid: i32) -> io::Result<StatFields> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{pid} is not a process id"),
        ));
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat: {e}")))
}

impl ProcessIdentity {
    /// The identity of the live process `pid`, read from `/proc/<pid>/stat`.
    pub fn of(pid: i32) -> io::Result<Self> {
        let stat = read_stat(pid)?;
        Ok(ProcessIdentity {
            pid,
            start_time: stat.start_time,
        })
    }

    /// The identity of the calling process.
    pub fn current() -> io::Result<Self> {
        Self::of(std::process::id() as i32)
    }

    /// True only if `/proc/<pid>/stat` exists, shows the same start time, and the
    /// process is not a zombie: a recycled pid or a process that has finished
    /// but is not yet reaped both count as dead.
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Ok(stat) => stat.start_time == self.start_time && !stat.is_finished(),
            Err(_) => false,
        }
    }
}

impl ProcessIdentity {
    /// True only if this very process (same start time) is stopped (see
    /// [`StatFields::is_stopped`]).
    pub fn is_frozen(&self) -> bool {
        read_stat(self.pid).is_ok_and(|s| s.start_time == self.start_time && s.is_stopped())
    }
}

impl fmt::Display for ProcessIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (started at tick {})", self.pid, self.start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line from a Linux 6.x `/proc/<pid>/stat` (52 fields).
    const SLEEP: &str = "12345 (sleep) S 100 12345 100 34816 12345 4194304 97 0 0 0 0 0 0 0 20 0 1 0 987654 2269184 256 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";

    #[test]
    fn parses_state_and_start_time() {
        let s = parse_stat(SLEEP).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!((s.ppid, s.pgrp), (100, 12345));
        assert_eq!(s.start_time, 987654);
        assert!(!s.is_finished());
    }

    #[test]
    fn command_name_with_spaces_and_parentheses() {
        let line = SLEEP.replace("(sleep)", "(a) b (c) Z 1 2)");
        let s = parse_stat(&line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn zombie_and_dead_are_finished() {
        let z = parse_stat(&SLEEP.replace(") S ", ") Z ")).unwrap();
        assert!(z.is_finished());
        let x = parse_stat(&SLEEP.replace(") S ", ") X ")).unwrap();
        assert!(x.is_finished());
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert_eq!(
            parse_stat("12 sleep S 1"),
            Err(StatParseError::NoCommandEnd)
        );
        assert_eq!(
            parse_stat("12 (sleep) S 1 2 3"),
            Err(StatParseError::MissingField(22))
        );
        assert_eq!(
            parse_stat("12 (sleep) S 1"),
            Err(StatParseError::MissingField(5))
        );
        assert_eq!(
            parse_stat("12 (sleep)"),
            Err(StatParseError::MissingField(3))
        );
        assert!(matches!(
            parse_stat(&SLEEP.replace(" 987654 ", " 98x654 ")),
            Err(StatParseError::BadField { field: 22, .. })
        ));
        assert!(matches!(
            parse_stat(&SLEEP.replace(") S ", ") SS ")),
            Err(StatParseError::BadField { field: 3, .. })
        ));
    }

    #[test]
    fn current_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessIdentity::current().unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.is_alive());
        let recycled = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!recycled.is_alive());
        assert!(
            !ProcessIdentity {
                pid: 0,
                start_time: 0
            }
            .is_alive()
        );
        assert!(
            !ProcessIdentity {
                pid: -1,
                start_time: 0
            }
            .is_alive()
        );
    }

    #[test]
    fn an_unreaped_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessIdentity::of(child.id() as i32);
        // Poll with a deadline until the child has finished; it stays a zombie
        // until `wait` below, and a zombie must count as dead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match read_stat(child.id() as i32) {
                Ok(s) if s.is_finished() => break,
                Ok(_) => {}
                Err(e) => panic!("the unreaped child vanished from /proc: {e}"),
            }
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Ok(id) = id {
            assert!(!id.is_alive());
        }
        child.wait().unwrap();
    }
}
