//! The BPF interpreter behind `cargo xtask bench --insns` (`cdn_tests::bpf_interp`).
//!
//! Its counts are only worth something if it takes the path the kernel takes. So for every path
//! of the benchmark, and for every truncation of those frames, its XDP action and output frame
//! must equal what BPF_PROG_TEST_RUN gives on the same data plane; and what it cannot run (an
//! access out of bounds, an unknown helper or opcode) must be an error, not a guess.

use anyhow::{Result, ensure};
use cdn_tests::bpf_interp::{
    Env, Fib, InterpError, KernelMaps, Program, SocketTable,
    paths::{Bench, in_namespace},
};

/// Every benchmark path: same action and bytes as the kernel, and the action the benchmark
/// expects (so the interpreter runs the path being counted).
#[test]
fn interpreter_agrees_with_the_kernel_on_every_benchmark_path() -> Result<()> {
    in_namespace(|| {
        let mut bench = Bench::new()?;
        let (program, maps, _) = bench.interpreter()?;
        let mut kernel = Vec::new();
        for path in &bench.paths {
            kernel.push(bench.scenario.dp.test_run(&path.frame)?);
        }
        let env = bench.env(&maps);
        for (path, (action, frame)) in bench.paths.iter().zip(kernel) {
            let out = program.run(&env, &path.frame)?;
            ensure!(
                action == path.action,
                "{}: kernel action {action}",
                path.name
            );
            ensure!(
                out.action == action,
                "{}: interpreter action {}, kernel {action}",
                path.name,
                out.action
            );
            ensure!(
                out.frame == frame,
                "{}: frames differ\ninterpreter {:02x?}\nkernel      {:02x?}",
                path.name,
                out.frame,
                frame
            );
            ensure!(
                out.counts.insns > 0 && out.counts.helper_calls > 0,
                "{}: nothing counted: {:?}",
                path.name,
                out.counts
            );
        }
        Ok(())
    })
}

/// Every benchmark frame cut at every length from an Ethernet header up: the parser's
/// bounds checks and the drop paths, same action and bytes as the kernel.
#[test]
fn interpreter_agrees_with_the_kernel_on_truncated_frames() -> Result<()> {
    in_namespace(|| {
        let mut bench = Bench::new()?;
        let (program, maps, _) = bench.interpreter()?;
        let frames: Vec<Vec<u8>> = bench
            .paths
            .iter()
            .flat_map(|p| (14..p.frame.len()).map(|n| p.frame[..n].to_vec()))
            .collect();
        let mut kernel = Vec::new();
        for f in &frames {
            kernel.push(bench.scenario.dp.test_run(f)?);
        }
        let env = bench.env(&maps);
        for (f, (action, frame)) in frames.iter().zip(kernel) {
            let out = program.run(&env, f)?;
            ensure!(
                out.action == action && out.frame == frame,
                "frame {f:02x?}: interpreter {} {:02x?}, kernel {action} {frame:02x?}",
                out.action,
                out.frame
            );
        }
        Ok(())
    })
}

/// Raw little-endian instruction slots: (opcode, dst | src << 4, offset, immediate).
fn program(slots: &[(u8, u8, i16, i32)]) -> Program {
    let bytes: Vec<u8> = slots
        .iter()
        .flat_map(|(code, regs, off, imm)| {
            let mut b = vec![*code, *regs];
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&imm.to_le_bytes());
            b
        })
        .collect();
    let raw = aya_obj::copy_instructions(&bytes).expect("whole instructions");
    Program::from_raw("test", &raw).expect("decodes")
}

fn run(p: &Program, frame: &[u8]) -> Result<cdn_tests::bpf_interp::Outcome, InterpError> {
    let maps = KernelMaps(Vec::new());
    let sockets = SocketTable::default();
    let env = Env {
        maps: &maps,
        sockets: &sockets,
        fib: Fib::Miss,
        ingress_ifindex: 1,
    };
    p.run(&env, frame)
}

const MOV64_IMM: u8 = 0xb7;
const EXIT: u8 = 0x95;
const CALL: u8 = 0x85;
const STXDW: u8 = 0x7b;
const LDXW: u8 = 0x61;
const LDXB: u8 = 0x71;
const ADD64_IMM: u8 = 0x07;
const JGT_REG: u8 = 0x2d;

#[test]
fn counts_instructions_helpers_and_the_exit() {
    // r0 = 2; r0 += 1; exit
    let p = program(&[(MOV64_IMM, 0, 0, 2), (ADD64_IMM, 0, 0, 1), (EXIT, 0, 0, 0)]);
    let out = run(&p, &[0; 14]).expect("runs");
    assert_eq!(out.action, 3);
    assert_eq!(out.counts.insns, 3);
    assert_eq!(out.counts.helper_calls, 0);
    assert_eq!(out.frame, vec![0; 14]);
}

#[test]
fn refuses_a_store_past_the_stack() {
    // *(u64 *)(r10 + 0) = r1: the stack ends at r10.
    let p = program(&[(STXDW, 10 | 1 << 4, 0, 0), (EXIT, 0, 0, 0)]);
    let err = run(&p, &[0; 14]).expect_err("out of bounds");
    assert!(err.to_string().contains("outside the region"), "{err}");
}

#[test]
fn refuses_a_packet_read_past_data_end() {
    // r2 = ctx->data; r3 = ctx->data_end; r0 = *(u8 *)(r2 + 14) on a 14-byte frame.
    let p = program(&[
        (LDXW, 2 | 1 << 4, 0, 0),
        (LDXW, 3 | 1 << 4, 4, 0),
        (LDXB, 2 << 4, 14, 0),
        (EXIT, 0, 0, 0),
    ]);
    let err = run(&p, &[0; 14]).expect_err("out of bounds");
    assert!(err.to_string().contains("outside the region"), "{err}");
    // With the bounds check a verifier demands, the same read is fine on a longer frame.
    let checked = program(&[
        (LDXW, 2 | 1 << 4, 0, 0),
        (LDXW, 3 | 1 << 4, 4, 0),
        (0xbf, 4 | 2 << 4, 0, 0), // r4 = r2
        (ADD64_IMM, 4, 0, 15),
        (MOV64_IMM, 0, 0, 1),
        (JGT_REG, 4 | 3 << 4, 1, 0), // if r4 > r3 goto exit
        (LDXB, 2 << 4, 14, 0),       // r0 = data[14]
        (EXIT, 0, 0, 0),
    ]);
    let mut frame = vec![0u8; 15];
    frame[14] = 2;
    assert_eq!(run(&checked, &frame).expect("in bounds").action, 2);
    assert_eq!(run(&checked, &frame[..14]).expect("guarded").action, 1);
}

#[test]
fn refuses_unknown_helpers_and_opcodes() {
    // bpf_trace_printk (6) is not emulated.
    let p = program(&[(CALL, 0, 0, 6), (EXIT, 0, 0, 0)]);
    let err = run(&p, &[0; 14]).expect_err("unknown helper");
    assert!(err.to_string().contains("helper id 6"), "{err}");
    let bytes = [0xffu8, 0, 0, 0, 0, 0, 0, 0];
    let raw = aya_obj::copy_instructions(&bytes).expect("one slot");
    let err = Program::from_raw("bad", &raw)
        .err()
        .expect("opcode 0xff is refused");
    assert!(
        matches!(err, InterpError::Decode { code: 0xff, .. }),
        "{err}"
    );
}
