//! The real maps of a loaded program, read through their file descriptors: the interpreter's
//! `bpf_map_lookup_elem` asks the kernel, so an LPM trie does its longest-prefix match and a
//! hash its exact match exactly as for the program.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    maps::{MapData, MapType},
    programs::ProgramInfo,
};

use super::{InterpError, Program};

/// One kernel map, opened by id.
pub struct KernelMap {
    pub name: String,
    pub map_type: MapType,
    pub key_size: usize,
    pub value_size: usize,
    data: MapData,
}

/// `union bpf_attr` as BPF_MAP_LOOKUP_ELEM reads it.
#[repr(C)]
struct LookupAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

impl KernelMap {
    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        )
    }

    /// The value stored under `key`, or `None` if there is none. For per-CPU maps, the value
    /// of CPU 0.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, InterpError> {
        if key.len() != self.key_size {
            return Err(InterpError::Map {
                map: self.name.clone(),
                what: format!("key of {} bytes, map has {}", key.len(), self.key_size),
            });
        }
        // A per-CPU lookup fills one 8-byte-aligned slot per possible CPU.
        let len = if self.per_cpu() {
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| InterpError::Map {
                map: self.name.clone(),
                what: format!("{what}: {e}"),
            })?;
            self.value_size.next_multiple_of(8) * cpus
        } else {
            self.value_size
        };
        let mut value = vec![0u8; len];
        let attr = LookupAttr {
            map_fd: self.data.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_LOOKUP_ELEM reads `key_size` bytes at `key` (checked above) and
        // writes at most `len` bytes at `value` (one value, or one slot per possible CPU for
        // per-CPU maps, which is how `len` was sized); both buffers outlive the call, and the
        // attribute struct is passed with its exact size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const LookupAttr,
                size_of::<LookupAttr>() as u32,
            )
        };
        if rc == 0 {
            value.truncate(self.value_size);
            return Ok(Some(value));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        Err(InterpError::Map {
            map: self.name.clone(),
            what: format!("BPF_MAP_LOOKUP_ELEM: {err}"),
        })
    }
}

/// The kernel maps behind each of a program's maps, in [`Program::maps`] order; `None` for a
/// map the loaded program does not use.
pub struct KernelMaps(pub Vec<Option<KernelMap>>);

impl KernelMaps {
    /// Opens every map the loaded program `info` uses and matches it to `program`'s maps by
    /// name (the kernel keeps the first 15 bytes of a name).
    pub fn of_program(info: &ProgramInfo, program: &Program) -> Result<Self, InterpError> {
        let kernel_err = |what: String| InterpError::Map {
            map: program.name.clone(),
            what,
        };
        let ids = info
            .map_ids()
            .map_err(|e| kernel_err(format!("map ids: {e}")))?
            .unwrap_or_default();
        let mut opened = Vec::new();
        for id in ids {
            let data = MapData::from_id(id).map_err(|e| kernel_err(format!("map {id}: {e}")))?;
            let info = data
                .info()
                .map_err(|e| kernel_err(format!("map {id}: {e}")))?;
            let map_type = info
                .map_type()
                .map_err(|e| kernel_err(format!("map {id}: {e}")))?;
            opened.push(KernelMap {
                name: info.name_as_str().unwrap_or_default().to_string(),
                map_type,
                key_size: info.key_size() as usize,
                value_size: info.value_size() as usize,
                data,
            });
        }
        let mut out = Vec::new();
        for map in &program.maps {
            let short: String = map.name.chars().take(15).collect();
            let found = opened
                .iter()
                .position(|k| k.name == short)
                .map(|i| opened.swap_remove(i));
            // A map the program never references is not among its ids; the interpreter only
            // fails if the program actually reaches for it.
            out.push(found);
        }
        Ok(Self(out))
    }
}
