"""The seccomp-BPF filter the code sandbox installs in a program's process: sockets stay off the host.

Why: a mount namespace does not stop `connect()` to a Unix socket file of the host (a world-writable one
takes anyone's data), `AF_VSOCK` reaches the hypervisor whatever the network namespace, and without root
and user namespaces there is no network namespace at all. The filter makes `socket()` fail with EPERM for
every family (a scored program needs none; the harness talks over pipes), and `socketpair()` for all but
AF_UNIX stream pairs: an anonymous connected pair (asyncio and multiprocessing use them) cannot address a
path, unlike a datagram pair, whose `sendto()` can.
io_uring is refused too (it can open sockets without `socket()`), and so is every syscall of another ABI
(i386 or x32 on x86_64, arm32 on aarch64), whose numbers the checks below would not match. `socket_filter`
builds the program for the machine; the sandbox installs it with `prctl(PR_SET_SECCOMP)` after
`PR_SET_NO_NEW_PRIVS`, which needs no privilege.
"""

from __future__ import annotations

import socket
import struct

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SOCKET_CALLS = {"x86_64": (41, 53), "aarch64": (198, 199)}  # socket, socketpair
_IO_URING_CALLS = (425, 426, 427)  # io_uring_setup, _enter, _register: the same on every architecture
_X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes and the offsets of struct seccomp_data (nr, arch, ip, args[6]; little-endian: an
# argument's low 32 bits are at its offset, and a socket family or type is an int).
_LD_ABS, _JEQ, _JGE, _AND, _RET = 0x20, 0x15, 0x35, 0x54, 0x06
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24
ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
DENY = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
_SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK / SOCK_CLOEXEC

_Instruction = tuple[int, int, str | int, str | int]  # code, k, jump-if-true, jump-if-false (label or 0)


def socket_filter(machine: str) -> bytes | None:
    """The filter's `struct sock_filter` array for `machine` (`platform.machine()`), None where unknown."""
    if machine not in _AUDIT_ARCH:
        return None
    socket_nr, socketpair_nr = _SOCKET_CALLS[machine]
    program: list[_Instruction | str] = [
        (_LD_ABS, _ARCH, 0, 0),
        (_JEQ, _AUDIT_ARCH[machine], 0, "deny"),
        (_LD_ABS, _NR, 0, 0),
        (_JGE, _X32_SYSCALL_BIT, "deny", 0),
        (_JEQ, socket_nr, "deny", 0),
        (_JEQ, socketpair_nr, "socketpair", 0),
        *[(_JEQ, nr, "deny", 0) for nr in _IO_URING_CALLS],
        (_RET, ALLOW, 0, 0),
        "socketpair",
        (_LD_ABS, _ARG0, 0, 0),
        (_JEQ, socket.AF_UNIX, 0, "deny"),
        (_LD_ABS, _ARG1, 0, 0),
        (_AND, _SOCK_TYPE_MASK, 0, 0),
        (_JEQ, socket.SOCK_STREAM, 0, "deny"),
        (_RET, ALLOW, 0, 0),
        "deny",
        (_RET, DENY, 0, 0),
    ]
    return _assemble(program)


def _assemble(program: list[_Instruction | str]) -> bytes:
    """Pack instructions, resolving label names (the strings in `program`) into forward jump offsets."""
    labels: dict[str, int] = {}
    instructions: list[_Instruction] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(target: str | int, at: int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return b"".join(
        struct.pack("<HBBI", code, offset(jt, i), offset(jf, i), k)
        for i, (code, k, jt, jf) in enumerate(instructions)
    )
