"""The data disk: bulk bytes into and out of a qube through a file it sees as a disk.

dom0's side (bulkhead.datadisk, the link's use of it) against the fake guest,
which reads the bytes a DATA frame names from the file as the real agent does,
and writes its own input into its area as the real agent does; the guest's
reader and writer (bulkhead.guest.datadisk) on a real file with O_DIRECT; and
which machines get the disk (microvm's 8 transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from pathlib import Path

import pytest

from bulkhead import datadisk
from bulkhead.agentlink import AgentLink
from bulkhead.backend.base import DiskSpec, MachineSpec, NicSpec
from bulkhead.backend.qemu_argv import build_argv
from bulkhead.guest import datadisk as guest_datadisk
from bulkhead.guest import protocol as P
from fake_guest import FakeGuest, connect, open_exec, run, wait_until
from fake_guest import sock_dir  # noqa: F401 -- a pytest fixture these tests use


def _spec(nics: int) -> MachineSpec:
    disks = tuple(DiskSpec(n, Path(f"/{n}")) for n in ("root", "private", "volatile"))
    return MachineSpec(name="work", qid=3, memory_mib=400, vcpus=1, virt_mode="pvh",
                       kernel=Path("/k"), kernelopts="", disks=disks,
                       nics=tuple(NicSpec(f"n{i}", "02:00:00:00:00:01", 10 + i)
                                  for i in range(nics)))


# --- which machines get one ----------------------------------------------------------------

def test_a_qube_with_a_transport_to_spare_gets_a_writable_raw_disk():
    spec = datadisk.with_data_disk(_spec(1), Path("/run/x/data-disks/work"))
    disk = spec.disks[-1]
    assert (disk.name, disk.fmt, disk.readonly) == (P.DATA_DISK_SERIAL, "raw", False)
    assert disk == datadisk.disk_spec(disk.path)        # as the saved boot's
    assert datadisk.with_data_disk(spec, Path("/elsewhere")) == spec      # once only
    from bulkhead.backend.accel import Accel
    argv = " ".join(build_argv(spec, Accel("tcg", ""), Path("/run/x")))
    assert f"serial={P.DATA_DISK_SERIAL}" in argv and "readonly=on" not in argv
    # 3 disks + 1 NIC + serial, rng, balloon + the data disk: microvm's 8 transports.
    assert len(spec.disks) + len(spec.nics) + datadisk.FIXED_TRANSPORTS == datadisk.TRANSPORTS


def test_a_netvm_with_two_nics_has_no_room_and_keeps_the_frames():
    spec = _spec(2)
    assert datadisk.with_data_disk(spec, Path("/d")) is spec
    assert not datadisk.has_data_disk(spec)


# --- dom0's writer ----------------------------------------------------------------------

async def _setup(sock_dir: Path):
    path = sock_dir / "data-disk"
    datadisk.make_file(path)
    assert path.stat().st_size == datadisk.SIZE
    disk = datadisk.DataDisk(path)
    guest = await FakeGuest(sock_dir / "work.sock").start()
    link = AgentLink("work", str(guest.path), data_disk=disk)
    end = await connect(link, guest)
    return guest, link, end, disk, path


def _read(path: Path, payload: bytes, allowed=(P.STDIN,)) -> bytes:
    mtype, offset, length = P.split_data(payload, allowed)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_bulk_input_goes_on_the_disk_within_one_slot_and_the_credit(sock_dir):
    async def scenario():
        guest, link, end, disk, path = await _setup(sock_dir)
        call = await open_exec(link, end)
        data = os.urandom(3 * datadisk.SLOT + 12345)
        writer = asyncio.create_task(call.write(data))
        received = b""
        offsets = set()
        while len(received) < datadisk.SLOT:
            mtype, chan, payload = await end.recv()
            assert (mtype, chan) == (P.DATA, call.chan)
            offsets.add(P.split_data(payload, (P.STDIN,))[1] // datadisk.SLOT)
            received += _read(path, payload)
        # A slot's worth and no credit back: dom0 waits rather than overwrite.
        assert len(received) == datadisk.SLOT
        await end.nothing_for(0.2)
        while len(received) < len(data):
            await end.send(P.CREDIT, call.chan, P.u32(min(datadisk.SLOT // 2, len(received))))
            while True:
                try:
                    mtype, chan, payload = await end.recv(timeout=0.2)
                except asyncio.TimeoutError:
                    break
                received += _read(path, payload)
        await asyncio.wait_for(writer, 2.0)
        assert received == data
        assert len(offsets) == 1                      # one call, one slot
        # A small write goes in a frame (a disk read costs the qube more).
        await end.send(P.CREDIT, call.chan, P.u32(call.window - call.send_credit))
        await call.write(b"tail")
        assert await end.recv() == (P.STDIN, call.chan, b"tail")
        assert link.violations == 0
        # Credit beyond the slot's window is a violation, as beyond the frames' window.
        await end.send(P.CREDIT, call.chan, P.u32(5))
        await wait_until(lambda: link.violations == 1)
        guest.stop()
    run(scenario())


def test_a_slot_comes_back_at_once_if_all_was_credited_else_after_a_pong(sock_dir):
    async def scenario():
        guest, link, end, disk, path = await _setup(sock_dir)
        call = await open_exec(link, end)
        await call.write(b"x" * 10000)
        await end.recv()
        await end.send(P.CREDIT, call.chan, P.u32(10000))
        await end.send(P.EXIT, call.chan, P.i32(0))
        await wait_until(lambda: len(disk._free) == datadisk.SLOTS)

        call = await open_exec(link, end)
        await call.write(b"y" * 10000)
        await end.recv()
        await end.send(P.EXIT, call.chan, P.i32(0))      # exits without reading it all
        mtype, chan, nonce = await end.recv()
        assert (mtype, chan) == (P.PING, 0)
        await asyncio.sleep(0.05)
        assert len(disk._free) == datadisk.SLOTS - 1      # the guest may still read it
        await end.send(P.PONG, 0, nonce)
        await wait_until(lambda: len(disk._free) == datadisk.SLOTS)
        assert link.violations == 0
        guest.stop()
    run(scenario())


def test_a_guest_that_keeps_its_slots_only_slows_itself(sock_dir):
    async def scenario():
        guest, link, end, disk, path = await _setup(sock_dir)
        for _ in range(datadisk.SLOTS):
            call = await open_exec(link, end)
            await call.write(b"z" * 5000)
            assert (await end.recv())[0] == P.DATA
            await end.send(P.EXIT, call.chan, P.i32(0))
            assert (await end.recv())[0] == P.PING            # never answered
        call = await open_exec(link, end)
        await call.write(b"w" * 5000)
        assert await end.recv() == (P.STDIN, call.chan, b"w" * 5000)   # frames, as before
        # A new connection (the agent restarted) starts with every slot free.
        link.close("test")
        assert len(disk._free) == datadisk.SLOTS
        guest.stop()
    run(scenario())


# --- the qube's own area: input of the calls it makes --------------------------------------

async def _inbound(sock_dir: Path):
    path = sock_dir / "data-disk"
    datadisk.make_file(path)
    calls: asyncio.Queue = asyncio.Queue()
    hold = asyncio.Event()

    async def on_call(call, target, service):
        await calls.put(call)
        await hold.wait()
    guest = await FakeGuest(sock_dir / "work.sock").start()
    link = AgentLink("work", str(guest.path), on_call=on_call,
                     data_disk=datadisk.DataDisk(path))
    end = await connect(link, guest)
    chan = P.GUEST_CHANNEL | 1
    await end.send(P.CALL, chan, b"personal\0bench.Sink")
    call = await asyncio.wait_for(calls.get(), 2.0)
    return guest, link, end, path, call, chan, hold


def _put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_qubes_input_comes_from_its_own_area_as_far_as_its_credit(sock_dir):
    async def scenario():
        guest, link, end, path, call, chan, hold = await _inbound(sock_dir)
        data = os.urandom(min(P.DATA_OUT_CHUNK, P.WINDOW))   # all the credit a call starts with
        offset = P.DATA_OUT_OFFSET + 3 * P.DATA_OUT_CHUNK
        _put(path, offset, data)
        await end.send(P.DATA, chan, P.pack_data(P.STDIN, offset, len(data)))
        assert await call.next_event(len(data)) == ("stdin", data)
        # Consumed: credited back, as for a STDIN frame.
        assert await end.recv() == (P.CREDIT, chan, P.u32(len(data)))
        assert link.violations == 0
        hold.set()
        guest.stop()
    run(scenario())


@pytest.mark.parametrize("case", ["dom0s-area", "past-the-end", "beyond-credit", "no-disk"])
def test_a_qubes_data_frame_outside_its_area_or_credit_is_a_violation(sock_dir, case):
    async def scenario():
        guest, link, end, path, call, chan, hold = await _inbound(sock_dir)
        offset, length = P.DATA_OUT_OFFSET, 8192
        if case == "dom0s-area":
            offset = P.DATA_OUT_OFFSET - 4096
        elif case == "past-the-end":
            offset = P.DATA_DISK_SIZE - 4096
        elif case == "beyond-credit":
            length = P.WINDOW + 512
        else:
            link.data_disk = None
        await end.send(P.DATA, chan, P.pack_data(P.STDIN, offset, length))
        await wait_until(lambda: link.violations == 1)
        hold.set()
        guest.stop()
    run(scenario())


def test_what_dom0_is_done_with_goes_back_to_the_host(tmp_path):
    path = tmp_path / "data-disk"
    datadisk.make_file(path)
    disk = datadisk.DataDisk(path)
    slot = disk.take()
    disk.write(slot, 0, memoryview(os.urandom(datadisk.SLOT)))
    _put(path, P.DATA_OUT_OFFSET, os.urandom(P.DATA_OUT_CHUNK))
    assert path.stat().st_blocks * 512 >= datadisk.SLOT + P.DATA_OUT_CHUNK
    disk.read_out(P.DATA_OUT_OFFSET, P.DATA_OUT_CHUNK)     # read: punched
    disk.release(slot)                                     # the qube read it: punched
    assert path.stat().st_blocks == 0
    assert path.stat().st_size == datadisk.SIZE            # the disk keeps its size
    disk.close()


@contextlib.contextmanager
def _o_direct_file(name: str, content: bytes, size: int, flags: int):
    """A file holding ``content`` (then zeros up to ``size``), opened with O_DIRECT and
    ``flags``, on a file system that has O_DIRECT (not tmpfs: /var/tmp)."""
    d = Path(os.environ.get("BULKHEAD_TEST_ROOT", "/var/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(max(size, len(content)))
    try:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError:
            pytest.skip("no O_DIRECT on this file system")
        try:
            yield path, fd
        finally:
            os.close(fd)
    finally:
        path.unlink()


def test_the_guest_writes_its_input_into_its_area_with_o_direct():
    with _o_direct_file("datadisk-out", b"", P.DATA_DISK_SIZE, os.O_RDWR) as (path, fd):
        disk = guest_datadisk.DataDisk()
        disk.fd = fd
        disk.out_buf = mmap.mmap(-1, P.DATA_OUT_CHUNK)
        disk.writable, disk.out_free = True, list(range(P.DATA_OUT_CHUNKS))
        r, w = os.pipe()
        chunk = disk.take_out()
        big = os.urandom(10000 + 3)            # not a whole number of blocks
        os.write(w, big)
        offset, n = disk.fill_out(chunk, r, P.DATA_OUT_CHUNK)
        assert (offset, n) == (P.DATA_OUT_OFFSET + chunk * P.DATA_OUT_CHUNK, len(big))
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(n) == big
        os.write(w, b"ls\n")                   # small: for a frame, not written
        assert disk.fill_out(chunk, r, P.DATA_OUT_CHUNK) == (None, 3)
        assert disk.out_bytes(3) == b"ls\n"
        os.write(w, big)                        # the credit bounds a read
        assert disk.fill_out(chunk, r, 5000)[1] == 5000
        disk.free_out(chunk)
        assert len(disk.out_free) == P.DATA_OUT_CHUNKS
        os.close(r)
        os.close(w)


# --- the guest's reader ----------------------------------------------------------------------

def test_the_guest_reads_any_range_with_o_direct():
    content = os.urandom(3 * 4096 + 100)
    with _o_direct_file("datadisk-test", content, 0, os.O_RDONLY) as (path, fd):
        reader = guest_datadisk.DataDisk()
        reader.fd = fd
        reader.size = len(content)
        for offset, length in ((0, 1), (1, 511), (511, 2), (700, 8000), (4096, 4096),
                               (len(content) - 7, 7)):
            assert reader.read(offset, length) == content[offset:offset + length]
        with pytest.raises(P.ProtocolViolation):
            reader.read(len(content) - 7, 8)


def test_a_big_run_is_lent_in_its_read_buffer_until_written():
    content = os.urandom(3 * guest_datadisk.LEND_MIN + 4096)
    with _o_direct_file("datadisk-test", content, 0, os.O_RDONLY) as (path, fd):
        reader = guest_datadisk.DataDisk()
        reader.fd, reader.size = fd, len(content)
        first = reader.read(100, 2 * guest_datadisk.LEND_MIN)
        second = reader.read(200, 2 * guest_datadisk.LEND_MIN)
        # Two runs, two buffers: the second read did not overwrite the first run.
        assert isinstance(first, memoryview) and first.obj is not second.obj
        assert first == content[100:100 + 2 * guest_datadisk.LEND_MIN]
        assert isinstance(reader.read(0, 10), bytes)      # a small one is copied
        queue = guest_datadisk.InputQueue(reader)
        queue.add(b"head:")
        queue.add(first)
        queue.add(second)
        queue.add(b":tail")
        r, w = os.pipe()
        got = bytearray()
        try:
            os.set_blocking(w, False)
            while queue:
                queue.write(w)
                got += os.read(r, 1 << 20)
        finally:
            os.close(r)
            os.close(w)
        assert bytes(got) == (b"head:" + content[100:100 + 2 * guest_datadisk.LEND_MIN]
                              + content[200:200 + 2 * guest_datadisk.LEND_MIN] + b":tail")
        # Written: both buffers went back, and the next read reuses one.
        assert len(reader.free_bufs) == 2
        assert reader.read(0, guest_datadisk.LEND_MIN).obj in (first.obj, second.obj)


def test_data_frames_name_only_the_streams_dom0_sends():
    assert P.split_data(P.pack_data(P.STDIN, 4096, 10), (P.STDIN,)) == (P.STDIN, 4096, 10)
    for bad in (P.pack_data(P.EXIT, 0, 10), P.pack_data(P.STDIN, 0, 0),
                P.pack_data(P.STDIN, 0, P.DATA_MAX + 1), b"short"):
        with pytest.raises(P.ProtocolViolation):
            P.split_data(bad, (P.STDIN,))
