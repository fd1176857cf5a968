//! The first process inside an agent's sandbox (`omoi-executor
//! --sandbox-init`): the sandbox has a network of its own with nothing but
//! loopback, so this bridges a loopback port per proxy to the proxy — its
//! unix socket bound in from the executor, or, in a pod of its own, the
//! executor's address, each connection opened with the attempt's token —
//! then runs the agent and ends with its exit status. In a pod
//! (`--lines`) it also carries the agent's two output streams as one, each
//! line marked with the stream it came from ([`STDOUT_MARK`]), since a
//! pod's log has only one. Plain threads: it is small, and runs as the
//! agent.

use std::ffi::OsString;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The flag that makes the executor's binary this init.
pub const FLAG: &str = "--sandbox-init";

/// The flag naming a variable whose value is the agent's stdin.
pub const STDIN_ENV_FLAG: &str = "--stdin-env";

/// The flag that carries the agent's stdout and stderr as one stream.
pub const LINES_FLAG: &str = "--lines";

/// What starts each line carrying a piece of the agent's stdout under
/// `--lines`, its bytes in base64 (standard, padded) after it: exactly what
/// the agent wrote, binary included. Lines without it are stderr's (and
/// the init's own).
pub const STDOUT_MARK: &str = "\u{1e}o ";

/// One `--bridge name:port=target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub port: u16,
    pub to: Target,
}

/// Where a bridge leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket (an absolute path).
    Socket(PathBuf),
    /// `tcp:host:port#token`: an address, each connection opened with the
    /// token and a newline.
    Tcp { addr: String, token: String },
}

impl Bridge {
    pub fn arg(&self) -> String {
        let to = match &self.to {
            Target::Socket(p) => p.display().to_string(),
            Target::Tcp { addr, token } => format!("tcp:{addr}#{token}"),
        };
        format!("{}:{}={to}", self.name, self.port)
    }

    fn parse(arg: &str) -> Option<Self> {
        let (name, rest) = arg.split_once(':')?;
        let (port, to) = rest.split_once('=')?;
        let to = match to.strip_prefix("tcp:") {
            Some(tcp) => {
                let (addr, token) = tcp.split_once('#')?;
                Target::Tcp {
                    addr: addr.to_owned(),
                    token: token.to_owned(),
                }
            }
            None if to.starts_with('/') => Target::Socket(to.into()),
            None => return None,
        };
        Some(Bridge {
            name: name.to_owned(),
            port: port.parse().ok()?,
            to,
        })
    }
}

/// Runs the init given the arguments after [`FLAG`]: `--bridge …`
/// repeated, `--`, the agent's command line.
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.collect();
    let split = args.iter().position(|a| a == "--");
    let (flags, argv) = match split {
        Some(i) if i + 1 < args.len() => (&args[..i], &args[i + 1..]),
        _ => {
            return fail(
                "usage: --sandbox-init [--lines] [--stdin-env NAME] [--bridge name:port=target]... -- program [args]",
            );
        }
    };
    let mut bridges = Vec::new();
    let mut lines = false;
    let mut stdin_env = None;
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        if flag == LINES_FLAG {
            lines = true;
            continue;
        }
        if flag == STDIN_ENV_FLAG {
            match flags.next() {
                Some(name) => stdin_env = Some(name.clone()),
                None => return fail("--stdin-env needs a variable's name"),
            }
            continue;
        }
        let bridge = (flag == "--bridge")
            .then(|| flags.next())
            .flatten()
            .and_then(|a| a.to_str())
            .and_then(Bridge::parse);
        match bridge {
            Some(b) => bridges.push(b),
            None => return fail(&format!("unknown argument {flag:?}")),
        }
    }
    for bridge in bridges {
        match TcpListener::bind(("127.0.0.1", bridge.port)) {
            Ok(listener) => {
                std::thread::spawn(move || serve(listener, bridge));
            }
            Err(e) => {
                return fail(&format!(
                    "cannot listen for the {} on port {}: {e}",
                    bridge.name, bridge.port
                ));
            }
        }
    }
    // A stop's SIGTERM reaches the whole process group, the agent included:
    // this init stays until the agent has ended (its grace), caught rather
    // than ignored so that the agent does not inherit an ignored SIGTERM.
    extern "C" fn wait_for_the_agent(_: nix::libc::c_int) {}
    let handler = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(wait_for_the_agent),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for signal in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGINT] {
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &handler) };
    }
    let mut agent = Command::new(&argv[0]);
    agent.args(&argv[1..]);
    // Its stdin handed over in a variable (a pod has no other way in):
    // written to it, and not left in its environment.
    let stdin = stdin_env.map(|name| {
        agent.env_remove(&name).stdin(std::process::Stdio::piped());
        std::env::var_os(&name).unwrap_or_default()
    });
    let status = run(agent, stdin, lines);
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
            (None, Some(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
            (None, None) => ExitCode::FAILURE,
        },
        Err(e) => {
            // 127, as a shell answers a program it cannot run.
            eprintln!("omoi sandbox: cannot start {:?}: {e}", argv[0]);
            ExitCode::from(127)
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("omoi sandbox: {message}");
    ExitCode::from(125)
}

/// Runs the agent, `stdin` written to it; with `lines`, both its streams
/// piped and each whole line written to stdout: its stdout's marked, its
/// stderr's not.
fn run(mut agent: Command, stdin: Option<OsString>, lines: bool) -> io::Result<std::process::ExitStatus> {
    use std::io::{BufRead, Write};
    if lines {
        agent
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    }
    let mut child = agent.spawn()?;
    if let (Some(mut input), Some(text)) = (child.stdin.take(), stdin) {
        std::thread::spawn(move || {
            // An agent that does not read its stdin is fine.
            let _ = input.write_all(std::os::unix::ffi::OsStrExt::as_bytes(text.as_os_str()));
        });
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(io::stdout()));
    let stdout = child.stdout.take().map(|mut stream| {
        let out = std::sync::Arc::clone(&out);
        std::thread::spawn(move || {
            use base64::Engine;
            let mut buf = vec![0u8; 48 * 1024];
            while let Ok(n) = io::Read::read(&mut stream, &mut buf) {
                if n == 0 {
                    break;
                }
                let piece = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(out, "{STDOUT_MARK}{piece}");
                let _ = out.flush();
            }
        })
    });
    let stderr = child.stderr.take().map(|stream| {
        let out = std::sync::Arc::clone(&out);
        std::thread::spawn(move || {
            for line in io::BufReader::new(stream).split(b'\n') {
                let Ok(line) = line else { break };
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(out, "{}", String::from_utf8_lossy(&line));
                let _ = out.flush();
            }
        })
    });
    let status = child.wait();
    for pump in stdout.into_iter().chain(stderr) {
        let _ = pump.join();
    }
    status
}

fn serve(listener: TcpListener, bridge: Bridge) {
    for conn in listener.incoming().flatten() {
        let bridge = bridge.clone();
        std::thread::spawn(move || {
            let proxied = match &bridge.to {
                Target::Socket(socket) => UnixStream::connect(socket).and_then(|proxy| splice(conn, proxy)),
                Target::Tcp { addr, token } => TcpStream::connect(addr.as_str()).and_then(|mut proxy| {
                    io::Write::write_all(&mut proxy, format!("{token}\n").as_bytes())?;
                    splice(conn, proxy)
                }),
            };
            if let Err(e) = proxied {
                // The agent's call fails at once; what it prints names the cause.
                let to = match &bridge.to {
                    Target::Socket(p) => p.display().to_string(),
                    Target::Tcp { addr, .. } => addr.clone(),
                };
                eprintln!(
                    "omoi sandbox: the executor's {} ({to}) is not answering: {e}",
                    bridge.name
                );
            }
        });
    }
}

/// Either end of a bridge.
trait Duplex: io::Read + io::Write + Send + Sized + 'static {
    fn again(&self) -> io::Result<Self>;
    fn done_writing(&self);
}

impl Duplex for TcpStream {
    fn again(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn done_writing(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Duplex for UnixStream {
    fn again(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn done_writing(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Copies both ways until each side has said all it has.
fn splice(tcp: TcpStream, proxy: impl Duplex) -> io::Result<()> {
    let (mut tcp_r, mut proxy_w) = (tcp.try_clone()?, proxy.again()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut proxy_w);
        proxy_w.done_writing();
    });
    let (mut proxy_r, mut tcp_w) = (proxy, tcp);
    let _ = io::copy(&mut proxy_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_round_trip_through_their_argument() {
        let b = Bridge {
            name: "model-proxy".into(),
            port: 13129,
            to: Target::Socket("/omoi/model.sock".into()),
        };
        assert_eq!(Bridge::parse(&b.arg()), Some(b));
        let b = Bridge {
            name: "egress-proxy".into(),
            port: 13128,
            to: Target::Tcp {
                addr: "10.1.2.3:13128".into(),
                token: "abc".into(),
            },
        };
        assert_eq!(b.arg(), "egress-proxy:13128=tcp:10.1.2.3:13128#abc");
        assert_eq!(Bridge::parse(&b.arg()), Some(b));
        assert_eq!(Bridge::parse("nope"), None);
        assert_eq!(Bridge::parse("a:1=relative/path"), None);
    }
}
