//! The first process inside an agent's sandbox (`omoi-executor
//! --sandbox-init`): the sandbox has a network of its own with nothing but
//! loopback, so this bridges a loopback port per proxy to the proxy's unix
//! socket (bound in from the executor), then runs the agent and ends with
//! its exit status. Plain threads: it is small, and runs as the agent.

use std::ffi::OsString;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The flag that makes the executor's binary this init.
pub const FLAG: &str = "--sandbox-init";

/// One `--bridge name:port=socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub port: u16,
    pub socket: PathBuf,
}

impl Bridge {
    pub fn arg(&self) -> String {
        format!("{}:{}={}", self.name, self.port, self.socket.display())
    }

    fn parse(arg: &str) -> Option<Self> {
        let (name, rest) = arg.split_once(':')?;
        let (port, socket) = rest.split_once('=')?;
        Some(Bridge {
            name: name.to_owned(),
            port: port.parse().ok()?,
            socket: socket.into(),
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
        _ => return fail("usage: --sandbox-init [--bridge name:port=socket]... -- program [args]"),
    };
    let mut bridges = Vec::new();
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
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
    let status = Command::new(&argv[0]).args(&argv[1..]).status();
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

fn serve(listener: TcpListener, bridge: Bridge) {
    for conn in listener.incoming().flatten() {
        let bridge = bridge.clone();
        std::thread::spawn(move || {
            match UnixStream::connect(&bridge.socket) {
                Ok(proxy) => {
                    let _ = splice(conn, proxy);
                }
                // The agent's call fails at once; what it prints names the cause.
                Err(e) => eprintln!(
                    "omoi sandbox: the executor's {} ({}) is not answering: {e}",
                    bridge.name,
                    bridge.socket.display()
                ),
            }
        });
    }
}

/// Copies both ways until each side has said all it has.
fn splice(tcp: TcpStream, unix: UnixStream) -> io::Result<()> {
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
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
            socket: "/omoi/model.sock".into(),
        };
        assert_eq!(Bridge::parse(&b.arg()), Some(b));
        assert_eq!(Bridge::parse("nope"), None);
    }
}
