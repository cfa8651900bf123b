//! The system-call filter builders run under (`filter-syscalls`, on by default; sandboxed
//! or not, as Nix applies it to every build), and the one for the user-mode network helper
//! ([`no_unix_sockets`]).
//!
//! A deny list, in classic BPF, checked on the architecture the call is made with (a 64-bit
//! builder can still enter the kernel through the 32-bit ABI, so both tables are filtered and
//! any other ABI, x32 included, is refused):
//!
//! - `chmod`, `fchmod`, `fchmodat` and `fchmodat2` with a setuid or setgid bit fail with
//!   `EPERM`. A setuid file in an output would let any local user run code as the build user
//!   and tamper with later builds (CVE-2024-52867); `fchmodat2` (Linux 6.6) slipped past
//!   Nix's first filter.
//! - Setting extended attributes fails with `ENOTSUP`: the store cannot represent them, and
//!   ACLs or file capabilities on an output would survive into the store's inodes.
//! - `io_uring_*` fail with `ENOSYS`: io_uring operations bypass this filter entirely.
//!
//! In the sandbox `PR_SET_NO_NEW_PRIVS` is always set before the filter is loaded (the
//! kernel requires it of an unprivileged process, and it keeps setuid programs inside the
//! sandbox from gaining anything). Outside it, it is set unless `allow-new-privileges` (a
//! root daemon then loads the filter before the builder's ids change, which needs no
//! `no_new_privs`). Where this build has no table for the machine's ABIs ([`available`]),
//! no filter is loaded at all.

/// One BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const fn ret_errno(e: i32) -> u32 {
    0x0005_0000 | (e as u32 & 0xffff)
}

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (little-endian `seccomp_data`).
const fn off_arg(i: u32) -> u32 {
    16 + 8 * i
}

const S_ISUID_ISGID: u32 = 0o6000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Calls of one ABI that the filter restricts.
struct Table {
    audit_arch: u32,
    /// `(number, index of the mode argument)`.
    chmods: &'static [(u32, u32)],
    setxattrs: &'static [u32],
    io_uring: &'static [u32],
    /// This ABI's numbers may carry the x32 bit (x86-64 only): refuse those.
    refuse_x32: bool,
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AUDIT_ARCH_ARM: u32 = 0x4000_0028;

const IO_URING: &[u32] = &[425, 426, 427];

#[cfg(target_arch = "x86_64")]
const TABLES: &[Table] = &[
    Table {
        audit_arch: AUDIT_ARCH_X86_64,
        // chmod, fchmod, fchmodat, fchmodat2
        chmods: &[(90, 1), (91, 1), (268, 2), (452, 2)],
        // setxattr, lsetxattr, fsetxattr, setxattrat
        setxattrs: &[188, 189, 190, 463],
        io_uring: IO_URING,
        refuse_x32: true,
    },
    Table {
        audit_arch: AUDIT_ARCH_I386,
        chmods: &[(15, 1), (94, 1), (306, 2), (452, 2)],
        setxattrs: &[226, 227, 228, 463],
        io_uring: IO_URING,
        refuse_x32: false,
    },
];

#[cfg(target_arch = "aarch64")]
const TABLES: &[Table] = &[
    Table {
        audit_arch: AUDIT_ARCH_AARCH64,
        // fchmod, fchmodat, fchmodat2 (no chmod on this ABI)
        chmods: &[(52, 1), (53, 2), (452, 2)],
        setxattrs: &[5, 6, 7, 463],
        io_uring: IO_URING,
        refuse_x32: false,
    },
    Table {
        audit_arch: AUDIT_ARCH_ARM,
        chmods: &[(15, 1), (94, 1), (333, 2), (452, 2)],
        setxattrs: &[226, 227, 228, 463],
        io_uring: IO_URING,
        refuse_x32: false,
    },
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const TABLES: &[Table] = &[];

/// The native ABI and its `socket` number, for [`no_unix_sockets`].
#[cfg(target_arch = "x86_64")]
const NATIVE_SOCKET: Option<(u32, u32)> = Some((AUDIT_ARCH_X86_64, 41));
#[cfg(target_arch = "aarch64")]
const NATIVE_SOCKET: Option<(u32, u32)> = Some((AUDIT_ARCH_AARCH64, 198));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE_SOCKET: Option<(u32, u32)> = None;

/// The kernel's view of `prog` (`struct sock_fprog`), valid while `prog` is.
pub(crate) fn fprog(prog: &[Insn]) -> libc::sock_fprog {
    libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    }
}

/// Loads `prog` on the calling thread (inherited by what it executes). A raw system call
/// only, for a child between `fork` or `clone` and `exec`; `false` with `errno` set if
/// refused.
///
/// # Safety
/// `prog` must point to instructions alive for the call (as [`fprog`] makes it).
pub(crate) unsafe fn install(prog: &libc::sock_fprog) -> bool {
    // SAFETY: the caller guarantees `prog`'s instructions; the kernel copies them.
    unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            prog as *const libc::sock_fprog,
        ) >= 0
    }
}

/// Whether this build of kiln has system-call tables for the machine's ABIs (x86-64 and
/// AArch64, each with its 32-bit ABI). Elsewhere no filter is loaded: [`filter`] kills every
/// call it cannot judge, which there would be every call.
pub fn available() -> bool {
    !TABLES.is_empty()
}

/// A filter for a helper that must not open a Unix socket (the user-mode network helper,
/// which runs as the daemon's user or as root: through a socket with a path — the daemon's
/// own, a bus of the user's or of systemd — it would act with those credentials; Landlock
/// does not cover `connect` on such sockets). `socket(AF_UNIX, …)` fails with `EACCES`
/// (`socketpair`, which it uses for itself, stays allowed), and so does every call of any
/// other ABI than the native one (whose `socketcall` would hide its arguments). `None`
/// where this build has no table for the machine.
pub fn no_unix_sockets() -> Option<Vec<Insn>> {
    let (arch, socket) = NATIVE_SOCKET?;
    let eacces = ret_errno(libc::EACCES);
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, arch, 1, 0),
        stmt(RET_K, eacces),
        stmt(LD_W_ABS, OFF_NR),
    ];
    if arch == AUDIT_ARCH_X86_64 {
        p.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(RET_K, eacces));
    }
    p.extend([
        jump(JEQ_K, socket, 0, 3),
        stmt(LD_W_ABS, off_arg(0)),
        jump(JEQ_K, libc::AF_UNIX as u32, 0, 1),
        stmt(RET_K, eacces),
        stmt(RET_K, RET_ALLOW),
    ]);
    Some(p)
}

// Silence "unused" on architectures whose table does not use every constant.
const _: [u32; 4] = [
    AUDIT_ARCH_X86_64,
    AUDIT_ARCH_I386,
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_ARM,
];

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The body for one ABI, entered with nothing loaded; ends by allowing the call.
fn table_body(t: &Table) -> Vec<Insn> {
    let mut b = vec![stmt(LD_W_ABS, OFF_NR)];
    if t.refuse_x32 {
        b.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
        b.push(stmt(RET_K, ret_errno(libc::ENOSYS)));
    }
    for &(nr, arg) in t.chmods {
        // A holds the number: on a match, look at the mode; otherwise skip the block.
        b.push(jump(JEQ_K, nr, 0, 4));
        b.push(stmt(LD_W_ABS, off_arg(arg)));
        b.push(jump(JSET_K, S_ISUID_ISGID, 0, 1));
        b.push(stmt(RET_K, ret_errno(libc::EPERM)));
        b.push(stmt(RET_K, RET_ALLOW));
    }
    for &nr in t.setxattrs {
        b.push(jump(JEQ_K, nr, 0, 1));
        b.push(stmt(RET_K, ret_errno(libc::ENOTSUP)));
    }
    for &nr in t.io_uring {
        b.push(jump(JEQ_K, nr, 0, 1));
        b.push(stmt(RET_K, ret_errno(libc::ENOSYS)));
    }
    b.push(stmt(RET_K, RET_ALLOW));
    b
}

/// The whole filter: dispatch on the architecture, one body per known ABI, and the process
/// killed for any other ABI (a call the tables cannot judge is not let through).
pub fn filter() -> Vec<Insn> {
    let mut prog = vec![stmt(LD_W_ABS, OFF_ARCH)];
    for t in TABLES {
        let body = table_body(t);
        // Bodies are a few dozen instructions; a jump offset is one byte.
        let skip = u8::try_from(body.len()).unwrap_or(u8::MAX);
        prog.push(jump(JEQ_K, t.audit_arch, 0, skip));
        prog.extend(body);
    }
    prog.push(stmt(RET_K, RET_KILL_PROCESS));
    prog
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the subset the filter uses, so the program's verdicts
    /// are checked here and not only by the kernel.
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                JEQ_K => pc += if a == i.k { i.jt } else { i.jf } as usize,
                JGE_K => pc += if a >= i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += if a & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn verdicts() {
        let p = filter();
        let eperm = ret_errno(libc::EPERM);
        let x = AUDIT_ARCH_X86_64;
        assert_eq!(run(&p, x, 90, [0, 0o4755, 0, 0, 0, 0]), eperm);
        assert_eq!(run(&p, x, 90, [0, 0o755, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, x, 91, [0, 0o2755, 0, 0, 0, 0]), eperm);
        assert_eq!(run(&p, x, 268, [0, 0, 0o4000, 0, 0, 0]), eperm);
        assert_eq!(run(&p, x, 268, [0, 0o4000, 0o644, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, x, 452, [0, 0, 0o6755, 0, 0, 0]), eperm);
        assert_eq!(run(&p, x, 188, [0; 6]), ret_errno(libc::ENOTSUP));
        assert_eq!(run(&p, x, 425, [0; 6]), ret_errno(libc::ENOSYS));
        assert_eq!(run(&p, x, 0, [0; 6]), RET_ALLOW);
        assert_eq!(
            run(&p, x, 90 | X32_SYSCALL_BIT, [0; 6]),
            ret_errno(libc::ENOSYS)
        );
        let u = no_unix_sockets().unwrap();
        let eacces = ret_errno(libc::EACCES);
        assert_eq!(
            run(&u, x, 41, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]),
            eacces
        );
        assert_eq!(
            run(&u, x, 41, [libc::AF_INET as u64, 1, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&u, x, 53, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(run(&u, x, 41 | X32_SYSCALL_BIT, [1, 0, 0, 0, 0, 0]), eacces);
        assert_eq!(run(&u, AUDIT_ARCH_I386, 102, [1, 0, 0, 0, 0, 0]), eacces);
        let i = AUDIT_ARCH_I386;
        assert_eq!(run(&p, i, 15, [0, 0o4755, 0, 0, 0, 0]), eperm);
        assert_eq!(run(&p, i, 306, [0, 0, 0o2000, 0, 0, 0]), eperm);
        assert_eq!(run(&p, i, 226, [0; 6]), ret_errno(libc::ENOTSUP));
        assert_eq!(run(&p, i, 3, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, 0x1234, 0, [0; 6]), RET_KILL_PROCESS);
    }
}
