//! What each signal means to the keeper: the table ([`action_of`]) that turns the signals init systems and
//! container runtimes send into what they ask for, and the signal mask the keeper reads them
//! through.
//!
//! The keeper blocks every signal of the table and reads them from a signalfd. That matters
//! most when it is PID 1 of a PID namespace (`ccmgr start --foreground` as a container's
//! entrypoint): the kernel drops a signal sent to a namespace's init for which it has the
//! default disposition — from inside the namespace always, from outside for all but SIGKILL
//! and SIGSTOP — so a signal the keeper did not block would vanish there instead of
//! stopping the stack (and, when it is not PID 1, SIGUSR1 or SIGPWR at their default would
//! kill the keeper and leave the services without their parent). A blocked signal is never
//! dropped: it waits for the signalfd.
//!
//! | signal | sent by | action |
//! |---|---|---|
//! | SIGTERM, SIGINT, SIGQUIT | `docker stop`, Ctrl-C, systemd, runit, s6 | orderly stop |
//! | SIGPWR | sysvinit/LXC (`lxc-stop`): power failure, halt | orderly stop |
//! | SIGRTMIN+3 | systemd's halt (`docker stop` of a systemd container) | orderly stop |
//! | SIGRTMIN+4 | systemd's poweroff (`machinectl poweroff`) | orderly stop |
//! | SIGRTMIN+5 | systemd's reboot | orderly stop (the runtime restarts the container) |
//! | SIGHUP | `systemctl reload`, operators | reload the configuration |
//! | SIGUSR1, SIGUSR2 | stray (systemd's own debug meanings do not apply) | logged, ignored |
//! | SIGCHLD | the kernel | reap |

use nix::sys::signal::SigSet;

/// What the keeper does with a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalAction {
    /// Stop the stack in shutdown order, then exit (0 when the stop was orderly).
    Stop(&'static str),
    /// Reload the configuration (`ccmgr reload`).
    Reload,
    /// Reap exited children.
    Reap,
    /// Known, with no meaning here: logged and otherwise ignored.
    Ignore(&'static str),
}

/// What signal number `signo` asks of the keeper; None for one it does not block. A match,
/// not a lookup in a built table: SIGCHLD is read on every service's exit, on the path from a
/// crash to its replacement.
pub fn action_of(signo: i32) -> Option<SignalAction> {
    let rt = libc::SIGRTMIN();
    Some(match signo {
        libc::SIGCHLD => SignalAction::Reap,
        libc::SIGTERM => SignalAction::Stop("SIGTERM"),
        libc::SIGINT => SignalAction::Stop("SIGINT"),
        libc::SIGQUIT => SignalAction::Stop("SIGQUIT"),
        libc::SIGPWR => SignalAction::Stop("SIGPWR (power failure / halt)"),
        libc::SIGHUP => SignalAction::Reload,
        libc::SIGUSR1 => SignalAction::Ignore("SIGUSR1"),
        libc::SIGUSR2 => SignalAction::Ignore("SIGUSR2"),
        n if n == rt + 3 => SignalAction::Stop("SIGRTMIN+3 (halt)"),
        n if n == rt + 4 => SignalAction::Stop("SIGRTMIN+4 (poweroff)"),
        n if n == rt + 5 => SignalAction::Stop("SIGRTMIN+5 (reboot)"),
        _ => return None,
    })
}

/// Every signal [`action_of`] knows.
pub fn handled() -> [i32; 11] {
    let rt = libc::SIGRTMIN();
    [
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGPWR,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        rt + 3,
        rt + 4,
        rt + 5,
    ]
}

/// The set of every signal [`handled`], to block and read through a signalfd. (nix's
/// `Signal` has no real-time signals, so the set is made with libc.)
pub fn mask() -> SigSet {
    let mut raw = *SigSet::empty().as_ref();
    for signo in handled() {
        // SAFETY: `raw` is an initialised sigset_t (from an empty SigSet) that we own, and
        // every number in the table is a valid signal (standard ones, or SIGRTMIN+3..5, far
        // below SIGRTMAX), so sigaddset cannot fail or write out of bounds.
        unsafe {
            libc::sigaddset(&mut raw, signo);
        }
    }
    // SAFETY: `raw` was initialised by sigemptyset (through SigSet::empty) and only changed
    // by sigaddset: a valid sigset_t.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// Whether this process is the init of its PID namespace (a container's entrypoint).
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn the_table_covers_what_init_systems_and_runtimes_send() {
        let rt = libc::SIGRTMIN();
        for signo in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGPWR,
            rt + 3,
            rt + 4,
            rt + 5,
        ] {
            assert!(
                matches!(action_of(signo), Some(SignalAction::Stop(_))),
                "{signo}"
            );
        }
        assert_eq!(action_of(libc::SIGHUP), Some(SignalAction::Reload));
        assert_eq!(action_of(libc::SIGKILL), None);
        for signo in handled() {
            assert!(action_of(signo).is_some(), "{signo}");
        }
        let mask = mask();
        assert!(mask.contains(Signal::SIGPWR));
        assert!(mask.contains(Signal::SIGUSR1));
        assert!(!mask.contains(Signal::SIGKILL));
    }
}
