//! Pinned maps that no longer fit the program.
//!
//! Pinned maps outlive the program that created them, and the loader reuses a pinned map by
//! name as it finds it. After an upgrade that changed a map's layout (the verdict counters
//! grow with every new reason; a value that gained a field), the new program would run against
//! the old map: counting past its end, or reading a value of the wrong size, and the
//! controller's reads would fail. So before loading, every pin whose key size, value size or
//! number of entries differs from what this build defines is removed, with a warning, and the
//! map is created anew. Its contents are lost, which for a map of another layout they are
//! anyway; maps whose layout is unchanged keep theirs (tables, hop history, next hops).

use std::path::PathBuf;

use aya::maps::MapInfo;
use cdn_common::maps as m;

use super::DataPlaneError;

/// Removes the pins in `pins` (map name, pin path) that do not match the object's definition
/// of that map. `TABLE`'s size is set at load time, to `table_entries`. Returns the names of
/// the maps whose pins were removed.
pub fn drop_stale_pins(
    pins: &[(&'static str, PathBuf)],
    table_entries: u32,
) -> Result<Vec<&'static str>, DataPlaneError> {
    let object = aya_obj::Object::parse(super::object::bytes())
        .map_err(|e| DataPlaneError::Object(e.to_string()))?;
    let mut dropped = Vec::new();
    for (name, path) in pins {
        if !path.exists() {
            continue;
        }
        let Some(def) = object.maps.get(*name) else {
            continue;
        };
        let entries = if *name == m::MAP_TABLE {
            table_entries
        } else {
            def.max_entries()
        };
        let want = (def.key_size(), def.value_size(), entries);
        let info =
            MapInfo::from_pin(path).map_err(|source| DataPlaneError::Map { map: name, source })?;
        let have = (info.key_size(), info.value_size(), info.max_entries());
        if want == have {
            continue;
        }
        log::warn!(
            map = *name,
            pinned:? = have,
            this_build:? = want;
            "pinned map has another layout (key size, value size, entries): unpinned, created anew"
        );
        std::fs::remove_file(path).map_err(|source| DataPlaneError::StalePin {
            path: path.clone(),
            source,
        })?;
        dropped.push(*name);
    }
    Ok(dropped)
}
