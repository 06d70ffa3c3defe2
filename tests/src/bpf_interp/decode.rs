//! Decoding: raw `bpf_insn` slots into [`Insn`], checked once before anything runs, so the
//! executor never meets an opcode it does not know and every jump lands on an instruction.
//!
//! The encoding is the kernel's (Documentation/bpf/standardization/instruction-set.rst):
//! the low three bits of the opcode are the class; ALU and jump classes carry the operation in
//! the high four bits and the source (immediate or register) in bit 3; load and store classes
//! carry the mode in the high three bits and the width in bits 3-4.

use aya_obj::generated::bpf_insn;

use super::InterpError;

/// Operand of an ALU or jump instruction.
#[derive(Clone, Copy, Debug)]
pub enum Src {
    Reg(u8),
    Imm(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Add,
    Sub,
    Mul,
    Div,
    SDiv,
    Or,
    And,
    Lsh,
    Rsh,
    Neg,
    Mod,
    SMod,
    Xor,
    Mov,
    /// Move with sign extension from this many bits (cpu v4).
    MovSx(u8),
    Arsh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JmpOp {
    Eq,
    Gt,
    Ge,
    Set,
    Ne,
    Sgt,
    Sge,
    Lt,
    Le,
    Slt,
    Sle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtomicOp {
    Add,
    Or,
    And,
    Xor,
    Xchg,
    CmpXchg,
}

/// The 64-bit immediate of `LD_IMM64`, after aya-obj's relocations.
#[derive(Clone, Copy, Debug)]
pub enum Imm64 {
    Const(u64),
    /// A map, by its index in [`super::Program::maps`].
    Map(usize),
    /// A pointer `off` bytes into the value of a data-section map (`.rodata`, `.data`, `.bss`).
    MapValue {
        map: usize,
        off: u32,
    },
}

#[derive(Clone, Copy, Debug)]
pub enum Insn {
    /// `wide`: the 64-bit class (ALU64); otherwise the 32-bit class, whose result is
    /// zero-extended.
    Alu {
        wide: bool,
        op: AluOp,
        dst: u8,
        src: Src,
    },
    /// Byte order: `swap` false truncates to `bits` (to little endian on this little-endian
    /// machine), true reverses the low `bits` bits' bytes.
    End {
        dst: u8,
        bits: u32,
        swap: bool,
    },
    LdImm64 {
        dst: u8,
        imm: Imm64,
    },
    /// The second slot of an `LD_IMM64`; never executed.
    Filler,
    Ldx {
        size: usize,
        signed: bool,
        dst: u8,
        src: u8,
        off: i16,
    },
    St {
        size: usize,
        dst: u8,
        off: i16,
        imm: i32,
    },
    Stx {
        size: usize,
        dst: u8,
        src: u8,
        off: i16,
    },
    Atomic {
        size: usize,
        op: AtomicOp,
        fetch: bool,
        dst: u8,
        src: u8,
        off: i16,
    },
    /// Unconditional jump to an absolute instruction index.
    Ja {
        target: usize,
    },
    Jmp {
        wide: bool,
        op: JmpOp,
        dst: u8,
        src: Src,
        target: usize,
    },
    CallHelper(u32),
    /// BPF-to-BPF call of the function starting at this instruction index.
    CallLocal(usize),
    Exit,
}

const LD: u8 = 0;
const LDX: u8 = 1;
const ST: u8 = 2;
const STX: u8 = 3;
const ALU: u8 = 4;
const JMP: u8 = 5;
const JMP32: u8 = 6;
const ALU64: u8 = 7;

const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const MODE_MEMSX: u8 = 0x80;
const MODE_ATOMIC: u8 = 0xc0;

const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_MAP_VALUE: u8 = 2;
const PSEUDO_CALL: u8 = 1;
const FETCH: i32 = 0x01;

/// Decodes every slot of a linked program. Fails on the first slot it cannot represent.
pub fn decode(raw: &[bpf_insn]) -> Result<Vec<Insn>, InterpError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut pc = 0;
    while pc < raw.len() {
        let insn = decode_one(raw, pc)?;
        out.push(insn);
        if matches!(insn, Insn::LdImm64 { .. }) {
            out.push(Insn::Filler);
            pc += 1;
        }
        pc += 1;
    }
    // Every jump and call must land on an executable slot.
    for (pc, insn) in out.iter().enumerate() {
        let target = match insn {
            Insn::Ja { target } | Insn::Jmp { target, .. } | Insn::CallLocal(target) => *target,
            _ => continue,
        };
        if matches!(out.get(target), None | Some(Insn::Filler)) {
            return Err(bad(pc, raw[pc].code, "jump target outside the program"));
        }
    }
    Ok(out)
}

fn bad(pc: usize, code: u8, what: &'static str) -> InterpError {
    InterpError::Decode { pc, code, what }
}

fn width(code: u8) -> usize {
    match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        0x10 => 1,
        _ => 8,
    }
}

fn reg(pc: usize, code: u8, r: u8, writable: bool) -> Result<u8, InterpError> {
    match r {
        0..=9 => Ok(r),
        10 if !writable => Ok(r),
        10 => Err(bad(pc, code, "write to the read-only frame pointer r10")),
        _ => Err(bad(pc, code, "register number above r10")),
    }
}

fn jump_target(pc: usize, code: u8, off: i64) -> Result<usize, InterpError> {
    usize::try_from(pc as i64 + 1 + off).map_err(|_| bad(pc, code, "jump before the start"))
}

fn decode_one(raw: &[bpf_insn], pc: usize) -> Result<Insn, InterpError> {
    let i = raw[pc];
    let code = i.code;
    let (dst_raw, src_raw) = (i.dst_reg(), i.src_reg());
    let class = code & 0x07;
    match class {
        ALU | ALU64 => {
            let wide = class == ALU64;
            let dst = reg(pc, code, dst_raw, true)?;
            let src = if code & 0x08 != 0 {
                Src::Reg(reg(pc, code, src_raw, false)?)
            } else {
                Src::Imm(i.imm)
            };
            let op = match (code & 0xf0, i.off) {
                (0x00, 0) => AluOp::Add,
                (0x10, 0) => AluOp::Sub,
                (0x20, 0) => AluOp::Mul,
                (0x30, 0) => AluOp::Div,
                (0x30, 1) => AluOp::SDiv,
                (0x40, 0) => AluOp::Or,
                (0x50, 0) => AluOp::And,
                (0x60, 0) => AluOp::Lsh,
                (0x70, 0) => AluOp::Rsh,
                (0x80, 0) => AluOp::Neg,
                (0x90, 0) => AluOp::Mod,
                (0x90, 1) => AluOp::SMod,
                (0xa0, 0) => AluOp::Xor,
                (0xb0, 0) => AluOp::Mov,
                (0xb0, 8 | 16 | 32) => AluOp::MovSx(i.off as u8),
                (0xc0, 0) => AluOp::Arsh,
                (0xd0, 0) => {
                    let bits = i.imm as u32;
                    if !matches!(bits, 16 | 32 | 64) {
                        return Err(bad(pc, code, "byte swap of an unknown width"));
                    }
                    // ALU|END|K is "to little endian" (a truncation here), ALU|END|X "to big
                    // endian"; ALU64|END (cpu v4) swaps unconditionally.
                    let swap = wide || code & 0x08 != 0;
                    return Ok(Insn::End { dst, bits, swap });
                }
                _ => return Err(bad(pc, code, "unknown ALU operation")),
            };
            Ok(Insn::Alu { wide, op, dst, src })
        }
        JMP | JMP32 => {
            let op = code & 0xf0;
            match op {
                0x00 => {
                    // JMP32|JA (cpu v4 `gotol`) takes its offset from the immediate.
                    let off = if class == JMP32 {
                        i64::from(i.imm)
                    } else {
                        i64::from(i.off)
                    };
                    return Ok(Insn::Ja {
                        target: jump_target(pc, code, off)?,
                    });
                }
                0x80 if class == JMP => {
                    return match src_raw {
                        0 => Ok(Insn::CallHelper(i.imm as u32)),
                        PSEUDO_CALL => {
                            Ok(Insn::CallLocal(jump_target(pc, code, i64::from(i.imm))?))
                        }
                        _ => Err(bad(pc, code, "call of a kfunc or unknown kind")),
                    };
                }
                0x90 if class == JMP => return Ok(Insn::Exit),
                _ => {}
            }
            let op = match op {
                0x10 => JmpOp::Eq,
                0x20 => JmpOp::Gt,
                0x30 => JmpOp::Ge,
                0x40 => JmpOp::Set,
                0x50 => JmpOp::Ne,
                0x60 => JmpOp::Sgt,
                0x70 => JmpOp::Sge,
                0xa0 => JmpOp::Lt,
                0xb0 => JmpOp::Le,
                0xc0 => JmpOp::Slt,
                0xd0 => JmpOp::Sle,
                _ => return Err(bad(pc, code, "unknown jump operation")),
            };
            let src = if code & 0x08 != 0 {
                Src::Reg(reg(pc, code, src_raw, false)?)
            } else {
                Src::Imm(i.imm)
            };
            Ok(Insn::Jmp {
                wide: class == JMP,
                op,
                dst: reg(pc, code, dst_raw, false)?,
                src,
                target: jump_target(pc, code, i64::from(i.off))?,
            })
        }
        LD => {
            if code != (LD | MODE_IMM | 0x18) {
                return Err(bad(pc, code, "legacy packet load or unknown LD mode"));
            }
            let next = raw
                .get(pc + 1)
                .ok_or_else(|| bad(pc, code, "LD_IMM64 without its second slot"))?;
            let dst = reg(pc, code, dst_raw, true)?;
            let imm = match src_raw {
                0 => Imm64::Const(u64::from(i.imm as u32) | (u64::from(next.imm as u32) << 32)),
                PSEUDO_MAP_FD => Imm64::Map(i.imm as usize),
                PSEUDO_MAP_VALUE => Imm64::MapValue {
                    map: i.imm as usize,
                    off: next.imm as u32,
                },
                _ => return Err(bad(pc, code, "LD_IMM64 of an unsupported pseudo source")),
            };
            Ok(Insn::LdImm64 { dst, imm })
        }
        LDX => {
            let signed = match code & 0xe0 {
                MODE_MEM => false,
                MODE_MEMSX => true,
                _ => return Err(bad(pc, code, "unknown LDX mode")),
            };
            Ok(Insn::Ldx {
                size: width(code),
                signed,
                dst: reg(pc, code, dst_raw, true)?,
                src: reg(pc, code, src_raw, false)?,
                off: i.off,
            })
        }
        ST => {
            if code & 0xe0 != MODE_MEM {
                return Err(bad(pc, code, "unknown ST mode"));
            }
            Ok(Insn::St {
                size: width(code),
                dst: reg(pc, code, dst_raw, false)?,
                off: i.off,
                imm: i.imm,
            })
        }
        STX => {
            let size = width(code);
            let dst = reg(pc, code, dst_raw, false)?;
            let src = reg(pc, code, src_raw, false)?;
            match code & 0xe0 {
                MODE_MEM => Ok(Insn::Stx {
                    size,
                    dst,
                    src,
                    off: i.off,
                }),
                MODE_ATOMIC if size >= 4 => {
                    let fetch = i.imm & FETCH != 0;
                    let op = match i.imm & !FETCH {
                        0x00 => AtomicOp::Add,
                        0x40 => AtomicOp::Or,
                        0x50 => AtomicOp::And,
                        0xa0 => AtomicOp::Xor,
                        0xe0 if fetch => AtomicOp::Xchg,
                        0xf0 if fetch => AtomicOp::CmpXchg,
                        _ => return Err(bad(pc, code, "unknown atomic operation")),
                    };
                    Ok(Insn::Atomic {
                        size,
                        op,
                        fetch,
                        dst,
                        src,
                        off: i.off,
                    })
                }
                _ => Err(bad(pc, code, "unknown STX mode")),
            }
        }
        _ => unreachable!("the class is three bits"),
    }
}
