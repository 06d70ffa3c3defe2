//! A small eBPF interpreter that runs a compiled XDP program on one frame against the real
//! maps of its loaded copy, and counts what it executes: instructions, helper calls and
//! BPF-to-BPF calls, per function. It knows nothing of cdn-steer's internals: it runs whatever
//! the object holds.
//!
//! - [`decode`]: instruction slots into checked [`decode::Insn`]s.
//! - [`memory`]: the bounds-checked regions (context, packet, stacks, map values, sockets).
//! - [`exec`]: the executor and the counts.
//! - [`helpers`]: the kernel helpers, with sockets and the FIB described per run.
//! - [`kmaps`]: the kernel maps, read through their fds.
//! - [`paths`]: the benchmark's data plane and paths, shared by `cdn-insns` and its test.
//!
//! The object is parsed and linked with aya-obj, as aya does before loading it: map
//! references become map indices and BPF-to-BPF calls are resolved into one instruction
//! stream. Whatever the interpreter cannot represent (an unknown opcode or helper, an access
//! outside a region) is an error, never a guess.

pub mod decode;
pub mod exec;
pub mod helpers;
pub mod kmaps;
pub mod memory;
pub mod paths;

use std::collections::{HashMap, HashSet};

use aya_obj::EbpfSectionKind;
use thiserror::Error;

pub use exec::Counts;
pub use helpers::{Fib, Proto, Socket, SocketTable};
pub use kmaps::KernelMaps;

#[derive(Debug, Error)]
pub enum InterpError {
    #[error("object: {0}")]
    Object(String),
    #[error("instruction {pc} (opcode {code:#04x}): {what}")]
    Decode {
        pc: usize,
        code: u8,
        what: &'static str,
    },
    #[error("{} of {len} bytes at {addr:#x}: {why}", if *write { "store" } else { "load" })]
    Access {
        addr: u64,
        len: usize,
        write: bool,
        why: &'static str,
    },
    #[error("helper {helper}: {what}")]
    Helper { helper: &'static str, what: String },
    #[error("helper id {0} is not emulated")]
    UnknownHelper(u32),
    #[error("map {map}: {what}")]
    Map { map: String, what: String },
    #[error("input: {0}")]
    Input(String),
    #[error("{0}")]
    Limit(&'static str),
    #[error("at instruction {pc} in {function}: {inner}")]
    At {
        pc: usize,
        function: String,
        inner: Box<InterpError>,
    },
}

/// One map of the object.
pub struct ObjMap {
    pub name: String,
    /// The initial bytes of a data section (`.rodata*`, `.data`, `.bss`), which the program
    /// addresses directly; the interpreter copies the kernel's current value of it at the start
    /// of a run (these bytes if the loaded program does not use it). `None` for a real map.
    pub data: Option<Vec<u8>>,
    pub writable: bool,
}

/// One program of an object, linked and decoded.
pub struct Program {
    pub name: String,
    insns: Vec<decode::Insn>,
    /// Indexed by the map numbers the instructions carry.
    pub maps: Vec<ObjMap>,
    /// (first instruction, demangled name) of every function linked into the program.
    functions: Vec<(usize, String)>,
}

/// The run's surroundings: maps, sockets, routes, and the receiving interface.
pub struct Env<'a> {
    pub maps: &'a KernelMaps,
    pub sockets: &'a SocketTable,
    pub fib: Fib,
    /// `xdp_md.ingress_ifindex`: the test run's loopback device, 1 in a fresh namespace.
    pub ingress_ifindex: u32,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The XDP action the program returned.
    pub action: u32,
    /// The frame from `data_meta` to `data_end`, as BPF_PROG_TEST_RUN returns it.
    pub frame: Vec<u8>,
    pub counts: Counts,
}

fn object_err(what: impl std::fmt::Display) -> InterpError {
    InterpError::Object(what.to_string())
}

impl Program {
    /// Parses `object`, links program `name` with every function it calls, and decodes it.
    pub fn from_object(object: &[u8], name: &str) -> Result<Self, InterpError> {
        let mut obj = aya_obj::Object::parse(object).map_err(object_err)?;
        if obj.has_btf_relocations() {
            return Err(object_err("CO-RE relocations are not supported"));
        }
        let mut names: Vec<String> = obj.maps.keys().cloned().collect();
        names.sort();
        let defs: Vec<aya_obj::Map> = names.iter().map(|n| obj.maps[n].clone()).collect();
        // The BTF function records name each function's type; the linked program keeps them
        // with the instruction each function starts at.
        let type_names: HashMap<u32, String> = obj
            .functions
            .values()
            .filter_map(|f| {
                let info = f.func_info.func_info.first()?;
                Some((info.type_id, f.name.clone()))
            })
            .collect();
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        // The "file descriptor" aya would write into each map reference is the map's index.
        let refs = names
            .iter()
            .zip(&defs)
            .enumerate()
            .map(|(i, (n, m))| (n.as_str(), i as i32, m));
        obj.relocate_maps(refs, &text_sections)
            .map_err(object_err)?;
        obj.relocate_calls(&text_sections).map_err(object_err)?;
        let key = obj
            .programs
            .get(name)
            .ok_or_else(|| object_err(format!("no program {name}")))?
            .function_key();
        let function = obj
            .functions
            .get(&key)
            .ok_or_else(|| object_err(format!("no function for program {name}")))?;
        let insns = decode::decode(&function.instructions)?;
        let mut functions: Vec<(usize, String)> = function
            .func_info
            .func_info
            .iter()
            .map(|info| {
                let name = type_names.get(&info.type_id).map_or_else(
                    || format!("function@{}", info.insn_off),
                    |n| format!("{:#}", rustc_demangle::demangle(n)),
                );
                (info.insn_off as usize, name)
            })
            .collect();
        if !functions.iter().any(|(start, _)| *start == 0) {
            functions.push((0, name.to_string()));
        }
        functions.sort();
        functions.dedup_by_key(|(start, _)| *start);
        let maps = names
            .into_iter()
            .zip(defs)
            .map(|(name, def)| ObjMap {
                data: (!def.data().is_empty()).then(|| def.data().to_vec()),
                writable: !matches!(def.section_kind(), EbpfSectionKind::Rodata),
                name,
            })
            .collect();
        Ok(Self {
            name: name.to_string(),
            insns,
            maps,
            functions,
        })
    }

    /// A program from raw instruction slots, without maps or calls to other objects: for
    /// testing the interpreter itself.
    pub fn from_raw(name: &str, raw: &[aya_obj::generated::bpf_insn]) -> Result<Self, InterpError> {
        Ok(Self {
            name: name.to_string(),
            insns: decode::decode(raw)?,
            maps: Vec::new(),
            functions: vec![(0, name.to_string())],
        })
    }

    /// Instruction slots (an `LD_IMM64` takes two), as the object holds them after linking.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// Instructions in the linked program, an `LD_IMM64` counted once.
    pub fn instruction_count(&self) -> usize {
        self.insns
            .iter()
            .filter(|i| !matches!(i, decode::Insn::Filler))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// The name of the function instruction `pc` belongs to.
    pub fn function_name(&self, pc: usize) -> String {
        self.functions
            .iter()
            .rev()
            .find(|(start, _)| *start <= pc)
            .map_or_else(|| "?".to_string(), |(_, n)| n.clone())
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, env: &Env<'_>, frame: &[u8]) -> Result<Outcome, InterpError> {
        exec::Machine::new(self, env, frame)?.run()
    }
}

/// The loaded program's size as the kernel reports it (BPF_OBJ_GET_INFO_BY_FD).
#[derive(Clone, Copy, Debug)]
pub struct KernelSizes {
    /// Bytes of instructions after the verifier's rewrites (8 per instruction).
    pub xlated_bytes: u32,
    /// Bytes of machine code from the JIT.
    pub jited_bytes: u32,
    /// Instructions the verifier processed (5.16+; 0 if not reported).
    pub verified_insns: u32,
}

impl KernelSizes {
    pub fn of(info: &aya::programs::ProgramInfo) -> Self {
        Self {
            xlated_bytes: info.size_translated().unwrap_or(0),
            jited_bytes: info.size_jitted(),
            verified_insns: info.verified_instruction_count().unwrap_or(0),
        }
    }
}
