//! Opening and verifying the service API's files, shared by the coordinator's side and the
//! services' side: the checks of an open file (regular, owned by the instance's owner, not
//! writable by others where it must not be) and the validation of a mapped control segment
//! (magic, version, counts, offsets, ids, sequence) before anything in it is believed. Apart
//! because it is the only code that trusts nothing in the files.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};

use super::layout::{ControlHeader, ControlRecord, takeover_from_code};
use super::{API_LAYOUT_VERSION, ApiError, CONTROL_MAGIC, ControlLayout, io_error};
use crate::config::Takeover;
use crate::shm::layout::SERVICE_ID_MAX;
use crate::shm::mapping::{Mapping, Protection};

/// What the header of a mapped control segment says, checked against the file's size.
pub(super) struct Validated {
    pub(super) layout: ControlLayout,
    pub(super) takeover: Takeover,
    pub(super) ids: Vec<String>,
    pub(super) sequence: Vec<usize>,
}

pub(super) fn validate<P: Protection>(
    map: &Mapping<P>,
    size: u64,
    path: &Path,
) -> Result<Validated, ApiError> {
    let corrupt = |detail: String| ApiError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // The header is at offset 0: its field offsets are file offsets.
    let magic = map
        .load_u64(offset_of!(ControlHeader, magic))
        .ok_or_else(|| corrupt(format!("it has only {size} bytes")))?;
    // The creator writes the magic last with release ordering.
    fence(Ordering::Acquire);
    if magic != CONTROL_MAGIC {
        return Err(corrupt(format!("its magic is {magic:#018x}")));
    }
    let read32 = |off: usize| map.load_u32(off).unwrap_or(0);
    let read64 = |off: usize| map.load_u64(off).unwrap_or(0);
    let version = read32(offset_of!(ControlHeader, layout_version));
    if version != API_LAYOUT_VERSION {
        return Err(corrupt(format!(
            "it has layout version {version}, this ccmgr uses {API_LAYOUT_VERSION}"
        )));
    }
    let count = read32(offset_of!(ControlHeader, service_count)) as usize;
    let layout = ControlLayout::compute(count)
        .ok_or_else(|| corrupt(format!("it claims {count} services")))?;
    for (what, found, ours) in [
        (
            "total size",
            read64(offset_of!(ControlHeader, total_size)),
            layout.total_size as u64,
        ),
        ("file size", size, layout.total_size as u64),
        (
            "record size",
            u64::from(read32(offset_of!(ControlHeader, record_size))),
            size_of::<ControlRecord>() as u64,
        ),
        (
            "gate offset",
            read64(offset_of!(ControlHeader, gate_offset)),
            layout.gate as u64,
        ),
        (
            "sequence offset",
            read64(offset_of!(ControlHeader, sequence_offset)),
            layout.sequence as u64,
        ),
        (
            "records offset",
            read64(offset_of!(ControlHeader, records_offset)),
            layout.records as u64,
        ),
    ] {
        if found != ours {
            return Err(corrupt(format!(
                "its {what} is {found}, its layout needs {ours}"
            )));
        }
    }
    let code = read32(offset_of!(ControlHeader, takeover));
    let takeover =
        takeover_from_code(code).ok_or_else(|| corrupt(format!("takeover mode {code}")))?;
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let rec = layout.record_at(i);
        let len = read32(rec + offset_of!(ControlRecord, id_len)) as usize;
        if len == 0 || len > SERVICE_ID_MAX {
            return Err(corrupt(format!("service #{i} has an id of {len} bytes")));
        }
        let bytes: Vec<u8> = (0..len)
            .map(|k| {
                map.load_u8(rec + offset_of!(ControlRecord, id) + k)
                    .unwrap_or(0)
            })
            .collect();
        let id = String::from_utf8(bytes)
            .map_err(|_| corrupt(format!("service #{i} has an id that is not UTF-8")))?;
        ids.push(id);
    }
    let mut seen = vec![false; count];
    let mut sequence = Vec::with_capacity(count);
    for k in 0..count {
        let index = read32(layout.sequence + k * 4) as usize;
        match seen.get_mut(index) {
            Some(s @ false) => *s = true,
            _ => {
                return Err(corrupt(format!(
                    "its shutdown sequence names #{index} out of place"
                )));
            }
        }
        sequence.push(index);
    }
    Ok(Validated {
        layout,
        takeover,
        ids,
        sequence,
    })
}

/// Check an open file of the instance: regular, owned by `owner`, and (`strict`) writable by
/// no one else.
pub(super) fn check_file(
    instance: &str,
    path: &Path,
    file: &File,
    owner: u32,
    strict: bool,
) -> Result<u64, ApiError> {
    let meta = file.metadata().map_err(io_error("examining", path))?;
    if !meta.file_type().is_file() {
        return Err(ApiError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if meta.uid() != owner {
        return Err(ApiError::WrongOwner {
            instance: instance.to_owned(),
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: owner,
        });
    }
    if strict && meta.mode() & 0o022 != 0 {
        return Err(ApiError::WritableByOthers {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(meta.len())
}

pub(super) fn open_existing(
    instance: &str,
    path: &Path,
    write: bool,
    action: &'static str,
) -> Result<File, ApiError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ApiError::NotRunning {
                    instance: instance.to_owned(),
                    path: path.to_path_buf(),
                }
            } else {
                io_error(action, path)(e)
            }
        })
}

pub(super) fn exists_or(e: io::Error, instance: &str, path: &Path) -> ApiError {
    if e.kind() == io::ErrorKind::AlreadyExists {
        ApiError::AlreadyExists {
            instance: instance.to_owned(),
            path: path.to_path_buf(),
        }
    } else {
        io_error("linking", path)(e)
    }
}
