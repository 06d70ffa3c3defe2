//! Running a command to completion, failing with what it printed on stderr.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs `program` with `args`; returns its stdout, or fails with the command line, exit status
/// and stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    checked(program, args, out)
}

/// Like [`run`], with `input` written to the command's stdin (e.g. `ip -batch -`).
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    // Written from another thread while this one collects the output: a command that prints
    // much while reading a long input would otherwise fill its stdout pipe and stall both.
    let out = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output();
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (written, out)
    });
    let out = match out {
        (_, Err(e)) => return Err(e).with_context(|| format!("waiting for {program}")),
        // A command that exits early closes its stdin; its exit status says more than EPIPE.
        (Err(e), Ok(out)) if out.status.success() => {
            return Err(e).with_context(|| format!("writing to {program}'s stdin"));
        }
        (_, Ok(out)) => out,
    };
    checked(program, args, out)
}

fn checked(program: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_failures() -> Result<()> {
        assert_eq!(run("echo", &["a", "b"])?, "a b\n");
        let e = run("sh", &["-c", "echo oops >&2; exit 3"]).expect_err("exit 3");
        let text = format!("{e:#}");
        assert!(
            text.contains("sh -c echo oops >&2; exit 3 failed"),
            "{text}"
        );
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.ends_with(": oops"), "{text}");
        let e = run("/nonexistent/program", &[]).expect_err("missing program");
        assert!(format!("{e:#}").starts_with("running /nonexistent/program"));
        Ok(())
    }

    #[test]
    fn input_reaches_stdin() -> Result<()> {
        // More than a pipe buffer each way.
        let input = "line\n".repeat(100_000);
        assert_eq!(run_with_input("cat", &[], &input)?, input);
        let e = run_with_input("sh", &["-c", "exit 4"], &input).expect_err("exit 4");
        assert!(format!("{e:#}").contains("exit status: 4"), "{e:#}");
        Ok(())
    }
}
