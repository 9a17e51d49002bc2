//! The fuzz targets: each feeds one input from outside to the real entry point of one parser
//! of ccmgr and checks what the project promises of every input: no panic, a bounded run, and
//! a rejection that is a sentence (a non-empty message that names its subject).
//!
//! This file is shared, by `#[path]`, between the fuzzer (`fuzz/src/bin/afl.rs`, built with
//! `cargo afl`) and `tests/fuzz_regressions.rs`, which replays every saved crash and runs a
//! short bounded random smoke run under plain `cargo test`, so the two can never drift
//! apart. It uses only ccmgr's public API, `tempfile` and `std`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use ccmgr::config::{Config, LoadOptions};

/// Every target, by the name `fuzz/run.sh` and the regression tests use.
pub const TARGETS: &[&str] = &[
    "config", "duration", "notify", "keeper", "segment", "control",
];

/// Inputs longer than this are cut: what a parser does with megabytes says nothing that 64 KiB
/// does not, and it would only slow the fuzzer down.
pub const MAX_INPUT: usize = 64 * 1024;

/// Runs `target` on `data`. Panics (an assertion of this file, or a panic of ccmgr) are the
/// findings.
pub fn run(target: &str, data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    match target {
        "config" => config(data),
        "duration" => duration(data),
        "notify" => notify(data),
        "keeper" => keeper(data),
        "segment" => segment(data),
        "control" => control(data),
        other => panic!("unknown fuzz target `{other}`; the targets are {TARGETS:?}"),
    }
}

/// A rejection must say something.
fn assert_sentence(what: &str, message: &str) {
    assert!(
        !message.trim().is_empty(),
        "{what}: a rejection with an empty message"
    );
}

/// The global and service TOML loaders, on a whole directory of files. The input is a small
/// archive: the global `ccmgr.toml` first, then files introduced by a line `--- NAME`
/// (written to `services.d/NAME`; NAME is kept to `[A-Za-z0-9._-]`, so a file stays inside).
/// `services_dir` comes from the command line, as `--services-dir` would give it, so no
/// input reads outside its own temp dir.
pub fn config(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).expect("services.d");
    let mut parts = split_files(data).into_iter();
    let global = parts.next().unwrap_or_default();
    std::fs::write(dir.path().join("ccmgr.toml"), global.1).expect("write ccmgr.toml");
    for (n, (name, text)) in parts.enumerate() {
        let mut name: String = String::from_utf8_lossy(name)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .take(64)
            .collect();
        if name.is_empty() || name.starts_with('.') {
            name = format!("f{n}.toml");
        }
        std::fs::write(services.join(name), text).expect("write a service file");
    }
    let options = LoadOptions {
        config_path: Some(dir.path().join("ccmgr.toml")),
        instance: Some("fuzz".into()),
        services_dir: Some(services),
    };
    match Config::load(&options) {
        Ok(config) => {
            // What `check` accepts, `start` ships to the coordinator as an image: it must read
            // back.
            let image = config.to_image();
            if let Err(e) = Config::from_image(&image) {
                panic!("an accepted configuration's image does not read back: {e}");
            }
        }
        Err(diagnostics) => {
            assert!(
                !diagnostics.is_empty(),
                "the configuration was refused without a diagnostic"
            );
            for d in diagnostics.iter() {
                assert_sentence("config", &d.to_string());
            }
        }
    }
}

/// `(name, contents)` pieces of a config-target input; the first is the global file.
fn split_files(data: &[u8]) -> Vec<(&[u8], &[u8])> {
    const MARK: &[u8] = b"--- ";
    let mut out = Vec::new();
    let mut name: &[u8] = b"";
    let mut rest = data;
    loop {
        // A marker starts a line: at the very start of a piece or after a newline.
        let found = rest
            .windows(MARK.len() + 1)
            .position(|w| w[0] == b'\n' && &w[1..] == MARK);
        let (text, next) = match found {
            Some(at) => (&rest[..at + 1], Some(&rest[at + 1 + MARK.len()..])),
            None => (rest, None),
        };
        out.push((name, text));
        let Some(next) = next else { break };
        let eol = next.iter().position(|&b| b == b'\n').unwrap_or(next.len());
        name = &next[..eol];
        rest = next.get(eol + 1..).unwrap_or_default();
        if out.len() > 64 {
            break;
        }
    }
    out
}

/// The duration syntax (`"250ms"`, `"7s"`), directly and as a TOML value would reach it.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ccmgr::duration::parse_duration(text) {
        Ok(d) => {
            // What parses prints as something that parses to the same value.
            let shown = d.to_string();
            let again = ccmgr::duration::parse_duration(&shown)
                .unwrap_or_else(|e| panic!("{text:?} parsed, its display {shown:?} not: {e}"));
            assert_eq!(
                again, d,
                "{text:?} shows as {shown:?}, which reads back differently"
            );
        }
        Err(e) => assert_sentence("duration", &e.to_string()),
    }
}

/// The notify socket, end to end: the datagram is sent to a real `NotifySocket` (bound once
/// per process in a temp dir) and read back through `recv`, the coordinator's own path; then
/// every accessor the coordinator uses is asked.
pub fn notify(data: &[u8]) {
    use ccmgr::notify::NotifySocket;
    use std::os::unix::net::UnixDatagram;
    static SOCKET: OnceLock<(NotifySocket, UnixDatagram)> = OnceLock::new();
    let (socket, sender) = SOCKET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("notify");
        let socket = NotifySocket::bind(&path).expect("bind the notify socket");
        let sender = UnixDatagram::unbound().expect("a datagram socket");
        sender.connect(&path).expect("connect to the notify socket");
        // A connected sender needs no name any more: the directory goes now, as a static
        // is never dropped.
        drop(dir);
        (socket, sender)
    });
    // The pure parser sees every input, also those the socket drops for their size.
    let _ = ccmgr::notify::parse_payload(data);
    if sender.send(data).is_err() {
        // Larger than the socket buffer allows: the kernel refused it, nothing reached ccmgr.
        return;
    }
    // Drain: the datagram just sent is the only one waiting (this process is its only
    // sender), so one `recv` returns it or drops it; a second finds nothing.
    for _ in 0..2 {
        match socket.recv() {
            Ok(Some(message)) => {
                let _ = (
                    message.is_ready(),
                    message.is_stopping(),
                    message.is_watchdog(),
                    message.status(),
                    message.claimed_main_pid(),
                    message.errno(),
                );
            }
            Ok(None) => break,
            Err(e) => assert_sentence("notify", &e.to_string()),
        }
    }
}

/// The keeper protocol's decoder, through the real `recv_message` on a real `SOCK_SEQPACKET`
/// pair, as both sides read it: the keeper (`ToKeeper`) and a coordinator (`FromKeeper`).
pub fn keeper(data: &[u8]) {
    use ccmgr::keeper::protocol::{FromKeeper, ToKeeper, channel, recv_message};
    use std::os::fd::AsFd;
    let (a, b) = channel().expect("a socket pair");
    if data.is_empty() {
        return; // an empty packet reads as end-of-file; that is not a message.
    }
    for decode_as_to_keeper in [true, false] {
        let sent = nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&a),
            data,
            nix::sys::socket::MsgFlags::empty(),
        );
        if sent.is_err() {
            return; // over the socket's packet limit: never reaches the decoder.
        }
        let result = if decode_as_to_keeper {
            recv_message::<ToKeeper>(b.as_fd()).map(|_| ())
        } else {
            recv_message::<FromKeeper>(b.as_fd()).map(|_| ())
        };
        if let Err(e) = result {
            assert_sentence("keeper", &e.to_string());
        }
    }
}

/// The control socket (`ccmgr start|stop|restart SERVICE...`): the input is what a client
/// sends. The request decoder and the client's reply decoder are fed it directly (an accepted
/// request must read back the same); then it goes through a real control socket, bound as the
/// keeper binds it, to the coordinator's server (`accept`, `read`): whatever it sends, the
/// server answers with at most one well-formed reply line, and a request it hands on is one the
/// decoder accepts.
pub fn control(data: &[u8]) {
    use ccmgr::control::protocol::{Reply, Request};
    use ccmgr::control::server::{ControlServer, Incoming, TOKEN_BASE};
    use std::io::Read as _;
    let line = data.strip_suffix(b"\n").unwrap_or(data);
    match Request::decode(line) {
        Ok(request) => {
            let again = request.to_line();
            assert_eq!(
                Request::decode(&again[..again.len() - 1]).as_ref(),
                Ok(&request),
                "an accepted request does not read back"
            );
        }
        Err(e) => assert_sentence("control request", &e),
    }
    if let Err(e) = Reply::decode(line) {
        assert_sentence("control reply", &e);
    }

    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("fuzz.sock");
    let fd = ccmgr::control::bind(&path, None).expect("the control socket binds");
    let mut server =
        ControlServer::from_inherited(fd, nix::unistd::geteuid().as_raw()).expect("a server on it");
    let epoll = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)
        .expect("an epoll");
    let mut client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    // The whole input fits the socket's buffer (64 KiB at most), so this never blocks.
    std::io::Write::write_all(&mut client, data).expect("send");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    server
        .accept(&epoll, Duration::ZERO)
        .expect("the connection is accepted");
    if let Incoming::Request(request) = server.read(&epoll, TOKEN_BASE) {
        let sent = data.strip_suffix(b"\n").expect("a request is a whole line");
        assert_eq!(Request::decode(sent).as_ref(), Ok(&request));
        return;
    }
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("a read timeout");
    let mut replies = Vec::new();
    let _ = client.read_to_end(&mut replies);
    if !replies.is_empty() {
        let reply = replies
            .strip_suffix(b"\n")
            .expect("a reply is a whole line");
        assert!(
            !reply.contains(&b'\n'),
            "more than one reply to a bad request"
        );
        match Reply::decode(reply) {
            Ok(Reply::Bad { why }) => assert_sentence("control bad reply", &why),
            other => panic!("a bad request answered with {other:?}"),
        }
    }
}

/// Segment open/verify, through the public `Segment::open` and `Segment::probe` on a real
/// segment file. The first byte picks how the rest becomes a segment:
/// - 0: patches to a valid segment (made once per process by `Segment::create`): 3-byte
///   records `(offset: u16 LE, scaled to the segment's size; value: u8)`, so the fuzzer
///   reaches the checks behind the header's;
/// - 1: like 0, then the file is cut to a length chosen by the next two bytes;
/// - 2: the rest is a configuration image for `Config::from_image` (the blob a segment
///   carries, decoded by a coordinator that takes over);
/// - anything else: the rest is the whole file.
///
/// When `open` accepts the file, every reader `status` uses is asked too.
pub fn segment(data: &[u8]) {
    use ccmgr::shm::segment::Segment;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 2 {
        if let Err(e) = Config::from_image(rest) {
            assert_sentence("config image", &e);
        }
        return;
    }
    let template = segment_template();
    let bytes = match mode {
        0 | 1 => {
            let mut bytes = template.to_vec();
            let (cut, patches) = if mode == 1 && rest.len() >= 2 {
                let at = u16::from_le_bytes([rest[0], rest[1]]) as usize * bytes.len() / 65536;
                (Some(at), &rest[2..])
            } else {
                (None, rest)
            };
            for patch in patches.chunks_exact(3) {
                let at = u16::from_le_bytes([patch[0], patch[1]]) as usize * bytes.len() / 65536;
                bytes[at] = patch[2];
            }
            if let Some(at) = cut {
                bytes.truncate(at);
            }
            bytes
        }
        _ => rest.to_vec(),
    };
    let instance = format!("fuzzseg-{}", std::process::id());
    let run_dir = fuzz_run_dir();
    let _ = Segment::remove(run_dir, &instance);
    let path = ccmgr::shm::segment_path(run_dir, &instance).expect("a valid instance name");
    write_private(&path, &bytes);
    // The group's read-only view verifies a private copy with the same checks.
    if let Err(e) = Segment::open_snapshot(run_dir, &instance) {
        assert_sentence("segment snapshot", &e.to_string());
    }
    match Segment::open(run_dir, &instance) {
        Ok(seg) => {
            // As `status` reads it; the first error ends the reading, as it ends `status`.
            let read = || -> Result<(), ccmgr::shm::ShmError> {
                seg.services()?;
                seg.instance_status()?;
                for i in 0..seg.service_count() {
                    seg.service_status(i)?;
                    seg.service_process(i)?;
                    seg.service_progress(i)?;
                }
                seg.instance_progress()?;
                if let Err(e) = Config::from_image(&seg.config_blob()?) {
                    assert_sentence("segment config blob", &e);
                }
                Ok(())
            };
            if let Err(e) = read() {
                assert_sentence("segment read", &e.to_string());
            }
        }
        Err(e) => assert_sentence("segment", &e.to_string()),
    }
    match Segment::probe(run_dir, &instance) {
        Ok(_) => {}
        Err(e) => assert_sentence("segment probe", &e.to_string()),
    }
    let _ = Segment::remove(run_dir, &instance);
}

/// The run directory of the segment target's instances (the segment's files live in an
/// instance's `run_dir`): one directory of the fuzzing user's, `$TMPDIR/ccmgr-fuzz-<uid>`,
/// mode 0700, shared by every process of a run (the fuzzer forks one per input, so a fresh
/// directory each would pile up); the instance names carry the pid.
fn fuzz_run_dir() -> &'static Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("ccmgr-fuzz-{}", nix::unistd::geteuid().as_raw()));
        let _ = std::fs::create_dir(&dir);
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        dir
    })
}

fn write_private(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(bytes).expect("write the segment file");
}

/// The bytes of a valid segment of two services with a real config image, made once per
/// process by the real `Segment::create` and then removed.
fn segment_template() -> &'static [u8] {
    use ccmgr::shm::segment::{Segment, SegmentSpec, ServiceStatic};
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(dir.path().join("services.d")).unwrap();
        std::fs::write(dir.path().join("ccmgr.toml"), "").unwrap();
        std::fs::write(
            dir.path().join("services.d/db.toml"),
            "command = [\"/bin/sleep\", \"1000\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("services.d/web.toml"),
            "command = [\"/bin/sleep\", \"1000\"]\nrequires = [\"db\"]\n",
        )
        .unwrap();
        let config = Config::load(&LoadOptions {
            config_path: Some(dir.path().join("ccmgr.toml")),
            instance: Some("fuzz".into()),
            services_dir: Some(dir.path().join("services.d")),
        })
        .expect("the template's configuration loads");
        let instance = format!("fuzztpl-{}", std::process::id());
        let _ = Segment::remove(fuzz_run_dir(), &instance);
        let spec = SegmentSpec {
            instance: instance.clone(),
            run_dir: fuzz_run_dir().to_owned(),
            group: None,
            services: config
                .services
                .iter()
                .map(|s| ServiceStatic {
                    id: s.id.clone(),
                    startup_timeout_ms: 1000,
                    shutdown_timeout_ms: 2000,
                })
                .collect(),
            startup_sequence: config.startup_sequence.iter().map(|&i| i as u32).collect(),
            shutdown_sequence: config.shutdown_sequence.iter().map(|&i| i as u32).collect(),
            config_blob: config.to_image(),
        };
        let (segment, guard) = Segment::create(&spec).expect("create the template segment");
        drop(guard);
        let bytes = std::fs::read(segment.path()).expect("read the template segment");
        let _ = segment.unlink();
        bytes
    })
}

/// Starting inputs that only code can make (a real segment, a real config image); the text
/// targets' seeds are files under fuzz/seeds/.
pub fn generated_seeds(target: &str) -> Vec<Vec<u8>> {
    if target != "segment" {
        return Vec::new();
    }
    let template = segment_template();
    let mut raw = vec![3u8];
    raw.extend_from_slice(template);
    let blob_at = template.len() - 64;
    let blob_patch = (blob_at * 65536 / template.len()) as u16;
    let mut patched = vec![0u8];
    patched.extend_from_slice(&blob_patch.to_le_bytes());
    patched.push(b'x');
    let image = segment_image();
    let mut with_image = vec![2u8];
    with_image.extend_from_slice(&image);
    vec![vec![0u8], vec![1, 0, 0x80], patched, with_image, raw]
}

/// The config image inside the segment template.
fn segment_image() -> Vec<u8> {
    let template = segment_template();
    let instance = format!("fuzzimg-{}", std::process::id());
    let run_dir = fuzz_run_dir();
    let _ = ccmgr::shm::segment::Segment::remove(run_dir, &instance);
    let path = ccmgr::shm::segment_path(run_dir, &instance).expect("a valid instance name");
    write_private(&path, template);
    let seg = ccmgr::shm::segment::Segment::open(run_dir, &instance).expect("the template opens");
    let blob = seg.config_blob().expect("the template's blob");
    let _ = seg.unlink();
    blob
}
