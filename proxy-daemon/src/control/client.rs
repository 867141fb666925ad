//! The thin CLI client: sends the words to the daemon, prints its answer,
//! exits with its status. No parsing here: the daemon owns the language.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Request, Response};

/// Sends one command and prints the answer; `print interval=...` repeats
/// (clearing the terminal between rounds) until interrupted. Returns the exit status.
pub fn run(socket: &Path, words: Vec<String>, json: bool) -> i32 {
    let mut round = 0;
    loop {
        match send(socket, words.clone(), json) {
            Ok(resp) => {
                if resp.repeat_ms.is_some() && resp.exit == 0 {
                    new_round(round);
                    round += 1;
                }
                print!("{}", resp.stdout);
                eprint!("{}", resp.stderr);
                match resp.repeat_ms {
                    Some(ms) if resp.exit == 0 => {
                        let _ = std::io::stdout().flush();
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    _ => return resp.exit,
                }
            }
            Err(e) => {
                eprintln!("proxyd: {e}");
                return 1;
            }
        }
    }
}

/// Starts round `round` of a repeating `print`: on a terminal the screen is
/// cleared; into a pipe or file the rounds follow each other, a blank line
/// between them (no screen codes in a log).
pub fn new_round(round: usize) {
    if std::io::stdout().is_terminal() {
        print!("\x1b[H\x1b[2J");
    } else if round > 0 {
        println!();
    }
}

/// Sends one command; returns the daemon's answer.
pub fn send(socket: &Path, words: Vec<String>, json: bool) -> Result<Response, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach proxyd at {}: {e} (is `proxyd run` running? --control or PROXYD_CONTROL sets the socket)",
            socket.display()
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut body = serde_json::to_string(&Request { words, json }).map_err(|e| e.to_string())?;
    body.push('\n');
    stream.write_all(body.as_bytes()).map_err(|e| format!("control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("control socket: {e}"))?;
    if line.is_empty() {
        return Err("proxyd closed the control connection without an answer (not root?)".into());
    }
    serde_json::from_str(&line).map_err(|e| format!("bad answer from proxyd: {e}"))
}
