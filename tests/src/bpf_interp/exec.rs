//! The executor: runs a decoded program from its first instruction to the final `exit`,
//! counting every instruction executed (an `LD_IMM64` is one), every helper call and every
//! BPF-to-BPF call, and which function each instruction belongs to.

use std::collections::{BTreeMap, HashMap};

use super::{
    Env, InterpError, Outcome, Program,
    decode::{AluOp, AtomicOp, Imm64, Insn, JmpOp, Src},
    memory::{Kind, Memory},
};

/// Bytes of stack per call frame (MAX_BPF_STACK).
const STACK: usize = 512;
/// The kernel's limit on nested BPF-to-BPF calls (MAX_CALL_FRAMES).
const MAX_FRAMES: usize = 8;
/// A run that takes longer than this is looping; the verifier would have refused it.
const MAX_STEPS: u64 = 1_000_000;

/// What one run executed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Instructions executed, helper calls and exits included.
    pub insns: u64,
    pub helper_calls: u64,
    pub bpf_calls: u64,
    /// Calls per helper id.
    pub helpers: BTreeMap<u32, u64>,
    /// Instructions executed in each function (by its first instruction's index), excluding
    /// the functions it calls.
    pub per_function: BTreeMap<usize, u64>,
}

struct Frame {
    return_pc: usize,
    /// r6-r9 and r10 of the caller: the callee gets fresh ones, as in the kernel.
    saved: [u64; 5],
    stack: usize,
    function: usize,
}

pub(super) struct Machine<'a> {
    pub(super) prog: &'a Program,
    pub(super) env: &'a Env<'a>,
    pub(super) mem: Memory,
    pub(super) regs: [u64; 11],
    /// Copies of map values looked up in this run, by (map, key).
    pub(super) values: HashMap<(usize, Vec<u8>), usize>,
    /// Sockets looked up and not yet released.
    pub(super) held: Vec<usize>,
    map_regions: Vec<usize>,
    frames: Vec<Frame>,
    counts: Counts,
}

impl<'a> Machine<'a> {
    pub(super) fn new(
        prog: &'a Program,
        env: &'a Env<'a>,
        frame: &[u8],
    ) -> Result<Self, InterpError> {
        let mut mem = Memory::new(frame, env.ingress_ifindex)?;
        // One region per map: a handle without bytes, or the bytes of a data section: as the
        // kernel holds them now (the controller may have written a global), else as the
        // object has them.
        let mut map_regions = Vec::with_capacity(prog.maps.len());
        for (i, m) in prog.maps.iter().enumerate() {
            let region = match &m.data {
                Some(bytes) => {
                    let kernel = match env.maps.0.get(i).and_then(Option::as_ref) {
                        Some(k) => k.lookup(&0u32.to_ne_bytes())?,
                        None => None,
                    };
                    let bytes = kernel.unwrap_or_else(|| bytes.clone());
                    mem.alloc(Kind::MapValue(i), bytes, m.writable)
                }
                None => mem.alloc(Kind::MapHandle(i), Vec::new(), false),
            };
            map_regions.push(region);
        }
        let mut regs = [0u64; 11];
        regs[1] = mem.pointer(mem.ctx, 0);
        let stack = mem.alloc(Kind::Stack(0), vec![0; STACK], true);
        regs[10] = mem.pointer(stack, STACK);
        Ok(Self {
            prog,
            env,
            mem,
            regs,
            values: HashMap::new(),
            held: Vec::new(),
            map_regions,
            frames: vec![Frame {
                return_pc: usize::MAX,
                saved: [0; 5],
                stack,
                function: 0,
            }],
            counts: Counts::default(),
        })
    }

    pub(super) fn run(mut self) -> Result<Outcome, InterpError> {
        let mut pc = 0;
        loop {
            match self.step(pc) {
                Ok(Some(next)) => pc = next,
                Ok(None) => break,
                Err(e) => {
                    return Err(InterpError::At {
                        pc,
                        function: self.prog.function_name(pc),
                        inner: Box::new(e),
                    });
                }
            }
        }
        if !self.held.is_empty() {
            return Err(InterpError::Limit(
                "the program exits holding a socket reference",
            ));
        }
        Ok(Outcome {
            action: self.regs[0] as u32,
            frame: self.mem.frame_out(),
            counts: self.counts,
        })
    }

    fn operand(&self, wide: bool, src: Src) -> u64 {
        match src {
            Src::Reg(r) => self.regs[r as usize],
            // Immediates are sign-extended to 64 bits, or taken as 32 bits by 32-bit ops.
            Src::Imm(i) if wide => i as i64 as u64,
            Src::Imm(i) => u64::from(i as u32),
        }
    }

    /// Executes the instruction at `pc`; returns the next pc, or `None` after the last exit.
    fn step(&mut self, pc: usize) -> Result<Option<usize>, InterpError> {
        let insn = *self
            .prog
            .insns
            .get(pc)
            .ok_or(InterpError::Limit("ran off the end of the program"))?;
        self.counts.insns += 1;
        if self.counts.insns > MAX_STEPS {
            return Err(InterpError::Limit("more than 1,000,000 instructions"));
        }
        let function = self.frames.last().map_or(0, |f| f.function);
        *self.counts.per_function.entry(function).or_default() += 1;
        match insn {
            Insn::Alu { wide, op, dst, src } => {
                let s = self.operand(wide, src);
                let d = self.regs[dst as usize];
                self.regs[dst as usize] = if wide {
                    alu64(op, d, s)
                } else {
                    alu32(op, d, s)
                };
            }
            Insn::End { dst, bits, swap } => {
                let v = self.regs[dst as usize];
                self.regs[dst as usize] = match (bits, swap) {
                    (16, false) => v & 0xffff,
                    (32, false) => v & 0xffff_ffff,
                    (16, true) => u64::from((v as u16).swap_bytes()),
                    (32, true) => u64::from((v as u32).swap_bytes()),
                    (_, false) => v,
                    (_, true) => v.swap_bytes(),
                };
            }
            Insn::LdImm64 { dst, imm } => {
                self.regs[dst as usize] = match imm {
                    Imm64::Const(v) => v,
                    Imm64::Map(m) => self.map_pointer(m, 0)?,
                    Imm64::MapValue { map, off } => self.map_pointer(map, off as usize)?,
                };
                return Ok(Some(pc + 2));
            }
            Insn::Filler => return Err(InterpError::Limit("jumped into an LD_IMM64")),
            Insn::Ldx {
                size,
                signed,
                dst,
                src,
                off,
            } => {
                let addr = self.regs[src as usize].wrapping_add(off as i64 as u64);
                let v = self.mem.load(addr, size)?;
                self.regs[dst as usize] = if signed { sign_extend(v, size * 8) } else { v };
            }
            Insn::St {
                size,
                dst,
                off,
                imm,
            } => {
                let addr = self.regs[dst as usize].wrapping_add(off as i64 as u64);
                self.mem.store(addr, size, imm as i64 as u64)?;
            }
            Insn::Stx {
                size,
                dst,
                src,
                off,
            } => {
                let addr = self.regs[dst as usize].wrapping_add(off as i64 as u64);
                let v = self.regs[src as usize];
                self.mem.store(addr, size, v)?;
            }
            Insn::Atomic {
                size,
                op,
                fetch,
                dst,
                src,
                off,
            } => self.atomic(size, op, fetch, dst, src, off)?,
            Insn::Ja { target } => return Ok(Some(target)),
            Insn::Jmp {
                wide,
                op,
                dst,
                src,
                target,
            } => {
                let s = self.operand(wide, src);
                let d = self.regs[dst as usize];
                let taken = if wide {
                    compare(op, d, s, d as i64, s as i64)
                } else {
                    let (d, s) = (d as u32, s as u32);
                    compare(op, d, s, d as i32, s as i32)
                };
                if taken {
                    return Ok(Some(target));
                }
            }
            Insn::CallHelper(id) => {
                self.counts.helper_calls += 1;
                *self.counts.helpers.entry(id).or_default() += 1;
                self.regs[0] = self.call_helper(id)?;
                // r1-r5 are scratched by a call; nothing may read them (the verifier sees to it).
                self.regs[1..=5].fill(0);
            }
            Insn::CallLocal(target) => {
                if self.frames.len() >= MAX_FRAMES {
                    return Err(InterpError::Limit("call depth above the kernel's 8 frames"));
                }
                self.counts.bpf_calls += 1;
                let stack = self
                    .mem
                    .alloc(Kind::Stack(self.frames.len()), vec![0; STACK], true);
                let mut saved = [0; 5];
                saved.copy_from_slice(&self.regs[6..=10]);
                self.frames.push(Frame {
                    return_pc: pc + 1,
                    saved,
                    stack,
                    function: target,
                });
                self.regs[10] = self.mem.pointer(stack, STACK);
                return Ok(Some(target));
            }
            Insn::Exit => {
                let frame = self
                    .frames
                    .pop()
                    .ok_or(InterpError::Limit("exit without a frame"))?;
                self.mem.kill(frame.stack);
                if self.frames.is_empty() {
                    return Ok(None);
                }
                self.regs[6..=10].copy_from_slice(&frame.saved);
                self.regs[1..=5].fill(0);
                return Ok(Some(frame.return_pc));
            }
        }
        Ok(Some(pc + 1))
    }

    fn map_pointer(&self, map: usize, off: usize) -> Result<u64, InterpError> {
        let region = *self.map_regions.get(map).ok_or(InterpError::Limit(
            "LD_IMM64 of a map the object does not define",
        ))?;
        Ok(self.mem.pointer(region, off))
    }

    fn atomic(
        &mut self,
        size: usize,
        op: AtomicOp,
        fetch: bool,
        dst: u8,
        src: u8,
        off: i16,
    ) -> Result<(), InterpError> {
        let addr = self.regs[dst as usize].wrapping_add(off as i64 as u64);
        let mask = if size == 8 { u64::MAX } else { 0xffff_ffff };
        let old = self.mem.load(addr, size)?;
        let s = self.regs[src as usize] & mask;
        let new = match op {
            AtomicOp::Add => old.wrapping_add(s),
            AtomicOp::Or => old | s,
            AtomicOp::And => old & s,
            AtomicOp::Xor => old ^ s,
            AtomicOp::Xchg => s,
            AtomicOp::CmpXchg => {
                if old == self.regs[0] & mask {
                    s
                } else {
                    old
                }
            }
        };
        self.mem.store(addr, size, new & mask)?;
        match op {
            AtomicOp::CmpXchg => self.regs[0] = old,
            _ if fetch => self.regs[src as usize] = old,
            _ => {}
        }
        Ok(())
    }
}

fn sign_extend(v: u64, bits: usize) -> u64 {
    let shift = 64 - bits;
    (((v << shift) as i64) >> shift) as u64
}

fn compare<U: Ord + Copy + Into<u64>, S: Ord>(op: JmpOp, d: U, s: U, ds: S, ss: S) -> bool {
    match op {
        JmpOp::Eq => d == s,
        JmpOp::Ne => d != s,
        JmpOp::Gt => d > s,
        JmpOp::Ge => d >= s,
        JmpOp::Lt => d < s,
        JmpOp::Le => d <= s,
        JmpOp::Set => d.into() & s.into() != 0,
        JmpOp::Sgt => ds > ss,
        JmpOp::Sge => ds >= ss,
        JmpOp::Slt => ds < ss,
        JmpOp::Sle => ds <= ss,
    }
}

fn alu64(op: AluOp, d: u64, s: u64) -> u64 {
    match op {
        AluOp::Add => d.wrapping_add(s),
        AluOp::Sub => d.wrapping_sub(s),
        AluOp::Mul => d.wrapping_mul(s),
        // Division by zero gives 0, modulo by zero leaves dst: the kernel's rules.
        AluOp::Div => d.checked_div(s).unwrap_or(0),
        AluOp::SDiv if s == 0 => 0,
        AluOp::SDiv => (d as i64).wrapping_div(s as i64) as u64,
        AluOp::Mod => d.checked_rem(s).unwrap_or(d),
        AluOp::SMod if s == 0 => d,
        AluOp::SMod => (d as i64).wrapping_rem(s as i64) as u64,
        AluOp::Or => d | s,
        AluOp::And => d & s,
        AluOp::Xor => d ^ s,
        AluOp::Lsh => d << (s & 63),
        AluOp::Rsh => d >> (s & 63),
        AluOp::Arsh => ((d as i64) >> (s & 63)) as u64,
        AluOp::Neg => (d as i64).wrapping_neg() as u64,
        AluOp::Mov => s,
        AluOp::MovSx(bits) => sign_extend(s, bits as usize),
    }
}

fn alu32(op: AluOp, d: u64, s: u64) -> u64 {
    let (d, s) = (d as u32, s as u32);
    let v = match op {
        AluOp::Add => d.wrapping_add(s),
        AluOp::Sub => d.wrapping_sub(s),
        AluOp::Mul => d.wrapping_mul(s),
        AluOp::Div => d.checked_div(s).unwrap_or(0),
        AluOp::SDiv if s == 0 => 0,
        AluOp::SDiv => (d as i32).wrapping_div(s as i32) as u32,
        AluOp::Mod => d.checked_rem(s).unwrap_or(d),
        AluOp::SMod if s == 0 => d,
        AluOp::SMod => (d as i32).wrapping_rem(s as i32) as u32,
        AluOp::Or => d | s,
        AluOp::And => d & s,
        AluOp::Xor => d ^ s,
        AluOp::Lsh => d << (s & 31),
        AluOp::Rsh => d >> (s & 31),
        AluOp::Arsh => ((d as i32) >> (s & 31)) as u32,
        AluOp::Neg => (d as i32).wrapping_neg() as u32,
        AluOp::Mov => s,
        AluOp::MovSx(bits) => sign_extend(u64::from(s), bits as usize) as u32,
    };
    u64::from(v)
}
