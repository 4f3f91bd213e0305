//! The sandbox's client pod: `GET /hostname` on `--target` every `--interval-ms`, one line
//! per request on stdout (`isthmus_sandbox::client::Record::to_line`), for ever.

use std::io::Write;
use std::time::Duration;

use isthmus_sandbox::client::{every, request};

fn main() {
    let mut target = None;
    let mut interval = Duration::from_millis(50);
    let mut timeout = Duration::from_secs(2);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.as_str(), value) {
            ("--target", Some(v)) => target = Some(v),
            ("--interval-ms", Some(v)) => match v.parse() {
                Ok(ms) => interval = Duration::from_millis(ms),
                Err(e) => fail(&format!("--interval-ms {v}: {e}")),
            },
            ("--timeout-ms", Some(v)) => match v.parse() {
                Ok(ms) => timeout = Duration::from_millis(ms),
                Err(e) => fail(&format!("--timeout-ms {v}: {e}")),
            },
            _ => fail(&format!("unknown argument {a}")),
        }
    }
    let Some(target) = target else {
        fail("--target HOST:PORT is required")
    };
    eprintln!("client: GET http://{target}/hostname every {interval:?}");
    let mut out = std::io::stdout().lock();
    every(interval, |seq| {
        let r = request(&target, seq, timeout);
        writeln!(out, "{}", r.to_line())
            .and_then(|_| out.flush())
            .is_ok()
    });
    // stdout is gone (the pod is stopping).
    std::process::exit(1);
}

fn fail(msg: &str) -> ! {
    eprintln!("isthmus-sandbox-client: {msg}\nusage: isthmus-sandbox-client --target HOST:PORT [--interval-ms 50] [--timeout-ms 2000]");
    std::process::exit(2)
}
