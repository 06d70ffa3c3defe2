//! `cargo xtask bench --insns`: how many BPF instructions each path of the benchmark executes,
//! counted by running the compiled `cdn_steer` program in the interpreter of
//! `cdn_tests::bpf_interp` against the real maps of a data plane configured as `cdn-bench`
//! configures it, and the loaded program's size after the verifier.
//!
//! Each path's interpreted action and frame are checked against the kernel's
//! BPF_PROG_TEST_RUN on the same frame before its count is printed, so a count always belongs
//! to the path the kernel takes.

use anyhow::{Result, bail};
use cdn_tests::bpf_interp::{
    Program, helpers,
    paths::{Bench, in_namespace},
};

struct Args {
    by_function: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { by_function: false };
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--by-function" => args.by_function = true,
            "-h" | "--help" => {
                println!(
                    "cdn-insns [--by-function]\n\
                     BPF instructions, helper calls and BPF-to-BPF calls executed by each path\n\
                     of `cargo xtask bench`, and the loaded program's xlated/jited size.\n\
                     --by-function: also split each path's instructions by function."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    in_namespace(|| run(&args))
}

fn run(args: &Args) -> Result<()> {
    let mut bench = Bench::new()?;
    let (program, maps, sizes) = bench.interpreter()?;
    let mut kernel = Vec::new();
    for path in &bench.paths {
        kernel.push(bench.scenario.dp.test_run(&path.frame)?);
    }
    let env = bench.env(&maps);
    let mut rows = Vec::new();
    for (path, (action, kernel_frame)) in bench.paths.iter().zip(kernel) {
        let out = program.run(&env, &path.frame)?;
        if action != path.action {
            bail!(
                "{}: the kernel returned {action}, the benchmark expects {}",
                path.name,
                path.action
            );
        }
        if out.action != action || out.frame != kernel_frame {
            bail!(
                "{}: the interpreter disagrees with the kernel (action {} against {action}, \
                 frames {})",
                path.name,
                out.action,
                if out.frame == kernel_frame {
                    "equal"
                } else {
                    "differ"
                }
            );
        }
        rows.push((path.name, out.counts));
    }
    println!(
        "{:<44} {:>6} {:>8} {:>9}   helpers called",
        "path", "insns", "helpers", "bpf calls"
    );
    for (name, c) in &rows {
        let called: Vec<String> = c
            .helpers
            .iter()
            .map(|(id, n)| {
                format!(
                    "{}{}",
                    helpers::name(*id),
                    if *n > 1 {
                        format!("×{n}")
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        println!(
            "{:<44} {:>6} {:>8} {:>9}   {}",
            name,
            c.insns,
            c.helper_calls,
            c.bpf_calls,
            called.join(", ")
        );
    }
    println!(
        "(instructions executed by the interpreter, helper calls and exits included, an LD_IMM64 \
         counted once; each path's action and frame equal the kernel's test run)"
    );
    println!(
        "program {}: {} instructions in the object ({} slots), xlated {} bytes ({} insns), \
         jited {} bytes, verifier processed {} insns",
        program.name,
        program.instruction_count(),
        program.len(),
        sizes.xlated_bytes,
        sizes.xlated_bytes / 8,
        sizes.jited_bytes,
        sizes.verified_insns
    );
    if args.by_function {
        by_function(&program, &rows);
    }
    Ok(())
}

fn by_function(program: &Program, rows: &[(&str, cdn_tests::bpf_interp::Counts)]) {
    for (name, c) in rows {
        println!("{name}:");
        for (start, n) in &c.per_function {
            println!("  {:>6}  {}", n, program.function_name(*start));
        }
    }
}
