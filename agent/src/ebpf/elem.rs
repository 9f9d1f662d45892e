//! Hash map elements read and removed in one system call, which aya offers for queues and
//! stacks only: the daemon takes each connection's kernel record this way.

use std::io;

use aya::{maps::MapData, Pod};

/// `BPF_MAP_LOOKUP_ELEM`, `BPF_MAP_DELETE_ELEM` and `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// The kernel's own "not supported" (524), which older kernels give for a command a map type
/// lacks; not in libc, which has the user-space `ENOTSUP`.
const ENOTSUPP: i32 = 524;

/// The map element commands' part of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One map element command on `map`; `Ok(false)` when `key` is absent.
///
/// # Safety
/// `key` and `value` must point to the map's key and value sizes of readable and writable
/// memory respectively (`value` may be null for a delete).
unsafe fn map_elem(
    cmd: libc::c_long,
    map: &MapData,
    key: *const u8,
    value: *mut u8,
) -> io::Result<bool> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd().cast_unsigned(),
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the element commands, its size passed
    // with it; the pointers in it are valid per this function's contract.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        e => Err(e),
    }
}

/// Reads and removes `key`'s value from a hash map: one system call
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14, which aya offers for queues
/// and stacks only) where a lookup and a delete take two; the two on a kernel without it. A
/// failed delete leaves an entry the LRU evicts; the value was still read once.
pub(super) fn take<K: Pod, V: Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let key_ptr = std::ptr::from_ref(key).cast::<u8>();
    let value_ptr = value.as_mut_ptr().cast::<u8>();
    // SAFETY: `key` is a `K` and `value` has room for a `V`; the map's sizes were checked
    // against `K` and `V` when it was opened.
    let found = match unsafe { map_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key_ptr, value_ptr) } {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
            // SAFETY: as above.
            unsafe { lookup_then_delete(map, key_ptr, value_ptr) }?
        }
        r => r?,
    };
    // SAFETY: the kernel wrote a whole `V` (a plain-old-data type) when it found the key.
    Ok(found.then(|| unsafe { value.assume_init() }))
}

/// [`take`] in two system calls, for a kernel without `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on
/// hash maps.
///
/// # Safety
/// As [`map_elem`]'s.
unsafe fn lookup_then_delete(map: &MapData, key: *const u8, value: *mut u8) -> io::Result<bool> {
    // SAFETY: per this function's contract.
    let found = unsafe { map_elem(BPF_MAP_LOOKUP_ELEM, map, key, value) }?;
    if found {
        // SAFETY: per this function's contract; a delete reads the key only.
        let _ = unsafe { map_elem(BPF_MAP_DELETE_ELEM, map, key, std::ptr::null_mut()) };
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use super::*;

    /// A kernel LRU hash map of `u64` to `[u8; 24]`, as `CONNECTIONS` is one (needs root).
    fn lru_map() -> MapData {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type: 9, // BPF_MAP_TYPE_LRU_HASH
            key_size: 8,
            value_size: 24,
            max_entries: 16,
            map_flags: 0,
        };
        // SAFETY: a valid `bpf_attr` prefix for BPF_MAP_CREATE, with its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0, // BPF_MAP_CREATE
                std::ptr::from_ref(&attr),
                std::mem::size_of::<CreateAttr>(),
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: the kernel just gave us this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
        MapData::from_fd(fd).unwrap()
    }

    fn put(map: &MapData, key: u64, value: [u8; 24]) {
        // SAFETY: key and value of the map's sizes.
        let put = unsafe {
            map_elem(
                2, // BPF_MAP_UPDATE_ELEM
                map,
                std::ptr::from_ref(&key).cast(),
                value.as_ptr().cast_mut(),
            )
        };
        assert!(put.unwrap());
    }

    /// A record is read once and gone: in one system call, and in the two a kernel without it
    /// takes.
    #[test]
    fn a_record_is_taken_once() {
        let map = lru_map();
        put(&map, 7, [1; 24]);
        put(&map, 8, [2; 24]);
        assert_eq!(take::<u64, [u8; 24]>(&map, &7).unwrap(), Some([1; 24]));
        assert_eq!(take::<u64, [u8; 24]>(&map, &7).unwrap(), None);
        assert_eq!(take::<u64, [u8; 24]>(&map, &9).unwrap(), None);

        let key = 8u64;
        let mut value = [0u8; 24];
        let take = |value: &mut [u8; 24]| {
            // SAFETY: key and value of the map's sizes.
            unsafe { lookup_then_delete(&map, std::ptr::from_ref(&key).cast(), value.as_mut_ptr()) }
        };
        assert!(take(&mut value).unwrap());
        assert_eq!(value, [2; 24]);
        assert!(!take(&mut value).unwrap());
    }
}
